"""RMSNorm and element-wise kernels (residual add, SwiGLU).

RMSNorm: ``y = x / sqrt(mean(x**2) + eps) * w`` (Zhang & Sennrich 2019; llama.cpp ``ggml_rms_norm``
followed by ``ggml_mul``; HF ``LlamaRMSNorm``, which also computes in float32). The mean of squares is
accumulated in float64.
SwiGLU: ``silu(g) * u`` with ``silu(g) = g / (1 + exp(-g))`` (Shazeer 2020; HF ``LlamaMLP``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from apr_numba.runtime import FASTMATH


@njit(fastmath=FASTMATH, error_model="numpy", nogil=True, cache=True, boundscheck=False)
def rmsnorm(out, x, w, eps):
    """out (T, D) <- RMSNorm(x (T, D)) * w (D,); out may alias x."""
    T, D = x.shape
    for t in range(T):
        ss = 0.0
        for i in range(D):
            v = np.float64(x[t, i])
            ss += v * v
        inv = np.float32(1.0 / np.sqrt(ss / D + eps))
        for i in range(D):
            out[t, i] = x[t, i] * inv * w[i]


@njit(fastmath=FASTMATH, error_model="numpy", nogil=True, cache=True, boundscheck=False)
def add_inplace(x, y):
    """x (T, D) += y (T, D): the residual connection."""
    T, D = x.shape
    for t in range(T):
        for i in range(D):
            x[t, i] += y[t, i]


@njit(fastmath=FASTMATH, error_model="numpy", nogil=True, cache=True, boundscheck=False)
def swiglu(out, gu, n_ff):
    """out (T, n_ff) <- silu(gu[:, :n_ff]) * gu[:, n_ff:]; gu (T, 2 n_ff) holds [gate | up]."""
    T = gu.shape[0]
    for t in range(T):
        for i in range(n_ff):
            g = gu[t, i]
            out[t, i] = g / (np.float32(1.0) + np.exp(-g)) * gu[t, n_ff + i]


@njit(fastmath=FASTMATH, error_model="numpy", nogil=True, cache=True, boundscheck=False)
def geglu(out, gu, n_ff):
    """out (T, n_ff) <- gelu_tanh(gu[:, :n_ff]) * gu[:, n_ff:] (GeGLU, Shazeer 2020; gemma's MLP).

    ``gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))`` (HF ``gelu_pytorch_tanh``, ggml
    ``ggml_gelu``), evaluated in float32.
    """
    T = gu.shape[0]
    k0 = np.float32(0.7978845608028654)  # sqrt(2 / pi)
    k1 = np.float32(0.044715)
    for t in range(T):
        for i in range(n_ff):
            g = gu[t, i]
            out[t, i] = np.float32(0.5) * g * (np.float32(1.0) + np.tanh(k0 * (g + k1 * g * g * g))) * gu[t, n_ff + i]


@njit(fastmath=FASTMATH, error_model="numpy", nogil=True, cache=True, boundscheck=False)
def rmsnorm_heads(x, col0, n_heads, head_dim, w, eps):
    """RMSNorm of each head of x (T, *) in place, columns [col0, col0 + n_heads*head_dim), weight w (head_dim,).

    QK-norm (Qwen3 ``q_norm`` / ``k_norm``, Gemma3; llama.cpp ``build_norm`` on the (head_dim, n_head, T) view).
    """
    T = x.shape[0]
    for t in range(T):
        for h in range(n_heads):
            o = col0 + h * head_dim
            ss = 0.0
            for i in range(head_dim):
                v = np.float64(x[t, o + i])
                ss += v * v
            inv = np.float32(1.0 / np.sqrt(ss / head_dim + eps))
            for i in range(head_dim):
                x[t, o + i] = x[t, o + i] * inv * w[i]


@njit(fastmath=FASTMATH, error_model="numpy", nogil=True, cache=True, boundscheck=False)
def scale_inplace(x, s):
    """x (T, D) *= s (the embedding scale sqrt(n_embd) of gemma)."""
    T, D = x.shape
    for t in range(T):
        for i in range(D):
            x[t, i] *= s


@njit(fastmath=FASTMATH, error_model="numpy", nogil=True, cache=True, boundscheck=False)
def softcap_inplace(x, cap):
    """x (T, D) <- cap * tanh(x / cap) (logit soft-capping, Gemma 2; llama.cpp ``final_logit_softcapping``)."""
    T, D = x.shape
    for t in range(T):
        for i in range(D):
            x[t, i] = cap * np.tanh(x[t, i] / cap)
