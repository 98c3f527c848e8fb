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
