"""A multi-turn conversation in the dashboard's chat mode. Nothing here imports textual.

The conversation is only the message list: each turn hands the whole list (earlier user / assistant turns and
the new user message, with the system prompt) to :func:`apr_numba.generation.generate.prompt_ids`, the one
definition of "the token ids of a chat" that ``apr_numba.generate`` / ``apr_numba.run`` use, and the engine runs
them with ``generate_events(..., reuse=True)``: :class:`apr_numba.generation.decoding.SequenceDecoder` keeps the
KV cache positions the new ids share with what the cache holds (``KVState.tokens``) and prefills only the rest
(llama.cpp's server slot reuse, ``n_past`` = the common prefix). So a dashboard chat turn and an API call with
the same messages feed the model the same ids at the same positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Conversation:
    """The chat so far: an optional system prompt and the user / assistant messages, oldest first."""

    system: str | None = None
    messages: list[dict] = field(default_factory=list)

    def with_user(self, user: str) -> list[dict]:
        """The OpenAI-style message list of the conversation plus a new ``user`` message (the system prompt is
        not in it: pass :attr:`system` as ``prompt_ids``' ``system``)."""
        return list(self.messages) + [{"role": "user", "content": user}]

    def render(self, model, user: str) -> list[int]:
        """Token ids of the conversation plus a new ``user`` message, ending with the assistant's generation
        prompt: exactly ``apr_numba.generation.generate.prompt_ids(model, messages, system=self.system)``.

        Raises:
            ArgumentError: the model has no chat template, or the template rejected the messages.
        """
        from apr_numba.generation.generate import prompt_ids

        return prompt_ids(model, self.with_user(user), system=self.system)

    def add_turn(self, user: str, assistant: str) -> None:
        """Record a finished exchange (``assistant``: the generated text, as ``apr_numba.generate`` returns it)."""
        self.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]

    def reset(self, system: str | None = None) -> None:
        """Start over (forget every turn), with a new system prompt (None: none)."""
        self.system, self.messages = (system or None), []

    @property
    def turns(self) -> int:
        return len(self.messages) // 2

    def to_dict(self) -> dict:
        return {"system": self.system, "messages": list(self.messages)}
