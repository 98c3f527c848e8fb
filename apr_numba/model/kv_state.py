"""The KV cache of one sequence and the token ids it holds (llama.cpp's ``llama_kv_cache`` + ``n_past``).

Used by :class:`apr_numba.model.decoder.Model` (which re-exports these names), the scheduler's slots and the
prefix reuse of ``generate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class KVState:
    """A KV cache and how many positions it holds (llama.cpp's ``llama_kv_cache`` + ``n_past``).

    k, v: float32 (n_layer, n_ctx, kv_dim). A model owns one; probes and shadows make their own
    (:meth:`Model.new_state`) so they never touch the user's cache. ``tokens``: the ids
    :meth:`Model.eval` appended, so that a later prompt sharing a prefix with them reuses its K/V
    (:func:`cached_tokens`); positions past ``n_past`` are stale and get overwritten.

    ``stack``, ``index``: for states made together by :meth:`Model.new_states`, the (K, V) float32
    (n_seq, n_layer, n_ctx, kv_dim) arrays whose row ``index`` are this state's k and v (llama.cpp's one KV
    cache with a ``seq_id`` per cell), so that :meth:`Model.eval_batch` runs them in one forward.
    """

    k: np.ndarray
    v: np.ndarray
    n_past: int = 0
    tokens: list[int] | None = field(default_factory=list)
    stack: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    index: int = 0

    @property
    def n_ctx(self) -> int:
        """Positions the cache can hold."""
        return self.k.shape[1]


def cached_tokens(state) -> list[int]:
    """The token ids whose K/V ``state`` holds at positions 0..n_past-1 ([] when not known, e.g. after a
    caller advanced ``n_past`` past :meth:`Model.eval`'s record)."""
    t = getattr(state, "tokens", None)
    if t is None or len(t) < state.n_past:
        return []
    return t[:state.n_past]


def _record_tokens(state, toks: np.ndarray) -> None:
    """Append ``toks`` at position n_past to the state's token record (called before n_past advances)."""
    t = getattr(state, "tokens", None)
    if state.n_past == 0:
        state.tokens = toks.tolist()
    elif t is not None and len(t) >= state.n_past:
        del t[state.n_past:]
        t.extend(toks.tolist())
    else:
        state.tokens = None  # unknown history: never reused
