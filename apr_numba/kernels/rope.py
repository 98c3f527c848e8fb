"""Rotary position embedding (RoPE, Su et al. 2021, arXiv:2104.09864).

Angle for position p and pair i: ``p * theta_base ** (-2 i / head_dim)``. Two pairings:

* NORM (llama.cpp ``LLAMA_ROPE_TYPE_NORM``, aprender rope_type 0): adjacent pairs (x[2i], x[2i+1]).
  GGUF llama files store Q/K rows permuted so that this equals HF's ``rotate_half``.
* NEOX (``LLAMA_ROPE_TYPE_NEOX``, rope_type 2; HF ``rotate_half``): pairs (x[i], x[i + head_dim/2]);
  Qwen2 uses it.

Rotation: ``(a, b) -> (a cos - b sin, a sin + b cos)``. Tables are computed in float64 then stored as
float32, like HF's ``inv_freq`` cos/sin cache.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from apr_numba.model.hparams import ROPE_NEOX
from apr_numba.runtime import FASTMATH


def rope_tables(n_ctx: int, head_dim: int, theta: float, freq_factors: np.ndarray | None = None,
                pos_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables, each float32 (n_ctx, head_dim // 2).

    ``freq_factors`` (head_dim // 2,): per-frequency divisors (llama.cpp ``rope_freqs`` / ggml_rope_ext's
    ``freq_factors``, how GGUF files carry Llama-3 RoPE scaling): angle = p * theta_i / f_i.
    ``pos_scale``: linear RoPE scaling (positions multiplied by 1 / factor).
    """
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if freq_factors is not None:
        inv_freq = inv_freq / np.asarray(freq_factors, dtype=np.float64)
    pos = np.arange(n_ctx, dtype=np.float64)
    if pos_scale != 1.0:
        pos = pos * pos_scale
    ang = pos[:, None] * inv_freq[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def spec_rope_tables(spec, n_ctx: int, freq_factors: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RoPE tables of a model described by ``spec`` (an :class:`~apr_numba.arch.spec.ArchSpec`): cos, sin float32
    (n_tables, n_ctx, head_dim/2) and the table index of each layer int64 (n_layer,); one table per distinct
    per-layer base (gemma3: global and local), with the file's ``rope_freqs`` divisors ``freq_factors`` and
    linear scaling applied (:func:`rope_tables`)."""
    hd = spec.hp.head_dim
    pos_scale = 1.0 / spec.rope_scaling.factor if spec.rope_scaling.kind == "linear" else 1.0
    bases = sorted(set(spec.layer_rope_base), key=spec.layer_rope_base.index)
    tabs = [rope_tables(n_ctx, hd, b, freq_factors, pos_scale) for b in bases]
    cos = np.stack([c for c, _ in tabs])
    sin = np.stack([s for _, s in tabs])
    return cos, sin, np.array([bases.index(b) for b in spec.layer_rope_base], np.int64)


@njit(fastmath=FASTMATH, nogil=True, cache=True, boundscheck=False)
def rope_inplace(x, col0, n_heads, head_dim, pos, cos, sin, rope_type):
    """Rotate heads of x (T, *) in place: columns [col0, col0 + n_heads*head_dim), row t at position pos[t].

    pos: int64 (T,) (consecutive for a prefill, each sequence's own in a batched decode step); cos, sin:
    float32 (n_ctx, head_dim/2) tables of :func:`rope_tables`; rope_type: 0 NORM, 2 NEOX.
    """
    T = x.shape[0]
    half = head_dim // 2
    for t in range(T):
        p = pos[t]
        for h in range(n_heads):
            o = col0 + h * head_dim
            for i in range(half):
                c = cos[p, i]
                s = sin[p, i]
                if rope_type == ROPE_NEOX:
                    ia = o + i
                    ib = o + i + half
                else:
                    ia = o + 2 * i
                    ib = ia + 1
                a = x[t, ia]
                b = x[t, ib]
                x[t, ia] = a * c - b * s
                x[t, ib] = a * s + b * c
