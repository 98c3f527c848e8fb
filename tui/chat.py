"""A multi-turn conversation rendered through the model's chat template, and the KV-cache prefix reuse that lets
each turn prefill only its new tokens. Nothing here imports textual.

Each turn renders the whole conversation (system prompt, earlier user / assistant turns, the new user message)
with ``Tokenizer.apply_chat_template`` (:mod:`apr_numba.model.chat_template`, transformers' semantics) and
tokenizes it. The backend's KV cache still holds the tokens of the previous turns; :func:`common_prefix` of the
new ids with those cached ids is the part that need not be computed again, so only the rest is prefilled (the
way llama.cpp's server reuses its slot's cache, ``n_past`` = the common prefix).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token id sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and int(a[i]) == int(b[i]):
        i += 1
    return i


def reusable(ids: Sequence[int], cached: Sequence[int], n_past: int) -> int:
    """Positions of the KV cache that ``ids`` can keep: the common prefix with the ``cached`` ids (what the
    cache holds at positions 0..n_past-1), at most ``len(ids) - 1`` so one token is still evaluated (its
    logits start the generation)."""
    return max(0, min(common_prefix(ids, cached[:n_past]), len(ids) - 1))


@dataclass
class Conversation:
    """The chat so far: an optional system prompt and the user / assistant messages, oldest first."""

    system: str | None = None
    messages: list[dict] = field(default_factory=list)

    def render(self, model, user: str) -> list[int]:
        """Token ids of the conversation plus a new ``user`` message, with the generation prompt (the
        template's ``add_generation_prompt=True``).

        Raises:
            ArgumentError: the model has no chat template, or the template rejected the messages.
        """
        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        text = model.tokenizer.apply_chat_template(msgs + [{"role": "user", "content": user}],
                                                   add_generation_prompt=True)
        return model.encode(text)

    def add_turn(self, user: str, assistant: str) -> None:
        """Record a finished exchange."""
        self.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]

    def reset(self, system: str | None = None) -> None:
        """Start over (forget every turn), with a new system prompt (None: none)."""
        self.system, self.messages = (system or None), []

    @property
    def turns(self) -> int:
        return len(self.messages) // 2

    def to_dict(self) -> dict:
        return {"system": self.system, "messages": list(self.messages)}
