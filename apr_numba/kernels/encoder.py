"""Kernels of a BERT-style encoder that the decoder path does not have.

Math (HF ``transformers/models/bert/modeling_bert.py``):

* ``BertEmbeddings``: ``LayerNorm(word[id] + token_type[tt] + position[pos])`` (absolute positions).
* LayerNorm (Ba et al. 2016; ``torch.nn.LayerNorm``): ``y = (x - mean) / sqrt(var + eps) * w + b`` with
  the biased variance over the last axis; eps from ``config.layer_norm_eps`` (1e-12 for MiniLM). Mean
  and variance are accumulated in float64 (two passes), the result is rounded to float32.
* ``BertSelfOutput`` / ``BertOutput``: ``LayerNorm(dense(h) + residual)`` -> :func:`add_layernorm`.
* ``BertIntermediate`` with ``hidden_act="gelu"``: the exact GELU ``0.5 x (1 + erf(x / sqrt(2)))``
  (Hendrycks & Gimpel 2016; ``torch.nn.functional.gelu`` with ``approximate='none'``), in float64.
* ``BertSelfAttention`` (eager): ``softmax(q k^T / sqrt(head_dim) + mask) v`` per head, *bidirectional*
  (no causal mask). A key padding mask (HF adds ``finfo.min`` to the scores of padded keys, whose
  softmax weight is then exactly 0) is applied here by leaving padded keys out of the loop.

Layout: the encoder works on the *real* tokens of a batch only, stacked row after row ("ragged"):
``x (N, D)`` with N = total number of real tokens; sequence b owns rows ``start[b] .. start[b]+len[b]-1``.
Padding is never computed. Every kernel here reduces along one
row (or one (row, head) pair) in a fixed order that depends only on that row and on its own sequence's
keys, so a text gives bit-identical results whatever else is in its batch and however long the batch's
padding would be. All kernels are float32 in and out.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from apr_numba.runtime import FASTMATH

_INV_SQRT2 = 0.7071067811865476


@njit(fastmath=FASTMATH, nogil=True, cache=True, boundscheck=False)
def _ln_row(out, t, x, w, b, eps):
    """out[t] <- LayerNorm(x) with x a (D,) float32 row; mean/var in float64."""
    D = x.shape[0]
    s = 0.0
    for i in range(D):
        s += np.float64(x[i])
    mean = s / D
    v = 0.0
    for i in range(D):
        d = np.float64(x[i]) - mean
        v += d * d
    rstd = 1.0 / math.sqrt(v / D + eps)
    for i in range(D):
        out[t, i] = np.float32((np.float64(x[i]) - mean) * rstd * np.float64(w[i]) + np.float64(b[i]))


@njit(parallel=True, fastmath=FASTMATH, nogil=True, cache=True, boundscheck=False)
def layernorm(out, x, w, b, eps):
    """out (N, D) <- LayerNorm(x (N, D)) * w (D,) + b (D,), row by row; out may alias x."""
    N, D = x.shape
    for n in prange(N):
        row = np.empty(D, np.float32)
        for i in range(D):
            row[i] = x[n, i]
        _ln_row(out, n, row, w, b, eps)


@njit(parallel=True, fastmath=FASTMATH, nogil=True, cache=True, boundscheck=False)
def embed_layernorm(out, ids, pos, tt, word, posw, typew, w, b, eps):
    """out (N, D) <- LayerNorm(word[ids] + typew[tt] + posw[pos]) * w + b (``BertEmbeddings``).

    ids, pos, tt: int64 (N,) token ids, absolute positions and token-type ids (validated by the
    caller); word (V, D), posw (P, D), typew (n_types, D), w, b (D,): float32. Sum order is HF's
    ``(inputs_embeds + token_type_embeddings) + position_embeddings``.
    """
    N, D = out.shape
    for n in prange(N):
        row = np.empty(D, np.float32)
        i_w = ids[n]
        i_p = pos[n]
        i_t = tt[n]
        for i in range(D):
            row[i] = (word[i_w, i] + typew[i_t, i]) + posw[i_p, i]
        _ln_row(out, n, row, w, b, eps)


@njit(parallel=True, fastmath=FASTMATH, nogil=True, cache=True, boundscheck=False)
def add_layernorm(x, y, w, b, eps):
    """x (N, D) <- LayerNorm(y + x) * w + b: a dense layer's output y (N, D) (bias included) plus the
    residual x, normalised (``BertSelfOutput`` / ``BertOutput``; dropout is the identity)."""
    N, D = x.shape
    for n in prange(N):
        row = np.empty(D, np.float32)
        for i in range(D):
            row[i] = y[n, i] + x[n, i]
        _ln_row(x, n, row, w, b, eps)


@njit(parallel=True, fastmath=FASTMATH, nogil=True, cache=True, boundscheck=False)
def add_bias(x, bias):
    """x (N, C) += bias (C,) row by row."""
    N, C = x.shape
    for n in prange(N):
        for i in range(C):
            x[n, i] += bias[i]


@njit(fastmath=FASTMATH, nogil=True, cache=True)
def gelu_erf(x):
    """Exact GELU of a float64 scalar: ``0.5 x (1 + erf(x / sqrt 2))``."""
    return 0.5 * x * (1.0 + math.erf(x * _INV_SQRT2))


@njit(parallel=True, fastmath=FASTMATH, nogil=True, cache=True, boundscheck=False)
def gelu(x):
    """x (N, F) <- gelu_erf(x) = 0.5 x (1 + erf(x / sqrt 2)) in place, evaluated in float64."""
    N, F = x.shape
    for n in prange(N):
        for i in range(F):
            x[n, i] = np.float32(gelu_erf(np.float64(x[n, i])))


@njit(parallel=True, fastmath=FASTMATH, nogil=True, cache=True, boundscheck=False)
def linear(out, X, W, bias):
    """out (T, R) <- X (T, C) @ W (R, C).T + bias (R,): a float32 dense layer (``torch.nn.Linear``).

    Register-blocked dot products: each task is 16 rows x 4 tokens; the inner loop keeps 4 x 4 partial
    sums over C (vectorized by LLVM with ``reassoc``), reading each weight and input element once per
    block. A token's result depends only on its own row of X (tail blocks re-use the last token and row
    rather than a different code path), so it is bit-identical for any T.
    """
    T, C = X.shape
    R = W.shape[0]
    nrb = (R + 15) // 16
    ntb = (T + 3) // 4
    for task_u in prange(nrb * ntb):
        task = np.int64(task_u)
        rb = task // ntb
        t0 = (task - rb * ntb) * 4
        i0, i1, i2, i3 = t0, min(t0 + 1, T - 1), min(t0 + 2, T - 1), min(t0 + 3, T - 1)
        x0, x1, x2, x3 = X[i0], X[i1], X[i2], X[i3]
        for r0 in range(rb * 16, min(R, rb * 16 + 16), 4):
            r1, r2, r3 = min(r0 + 1, R - 1), min(r0 + 2, R - 1), min(r0 + 3, R - 1)
            w0, w1, w2, w3 = W[r0], W[r1], W[r2], W[r3]
            a00 = a01 = a02 = a03 = np.float32(0.0)
            a10 = a11 = a12 = a13 = np.float32(0.0)
            a20 = a21 = a22 = a23 = np.float32(0.0)
            a30 = a31 = a32 = a33 = np.float32(0.0)
            for c in range(C):
                p0, p1, p2, p3 = x0[c], x1[c], x2[c], x3[c]
                u = w0[c]
                a00 += u * p0
                a01 += u * p1
                a02 += u * p2
                a03 += u * p3
                u = w1[c]
                a10 += u * p0
                a11 += u * p1
                a12 += u * p2
                a13 += u * p3
                u = w2[c]
                a20 += u * p0
                a21 += u * p1
                a22 += u * p2
                a23 += u * p3
                u = w3[c]
                a30 += u * p0
                a31 += u * p1
                a32 += u * p2
                a33 += u * p3
            b0, b1, b2, b3 = bias[r0], bias[r1], bias[r2], bias[r3]
            out[i0, r0], out[i1, r0], out[i2, r0], out[i3, r0] = a00 + b0, a01 + b0, a02 + b0, a03 + b0
            out[i0, r1], out[i1, r1], out[i2, r1], out[i3, r1] = a10 + b1, a11 + b1, a12 + b1, a13 + b1
            out[i0, r2], out[i1, r2], out[i2, r2], out[i3, r2] = a20 + b2, a21 + b2, a22 + b2, a23 + b2
            out[i0, r3], out[i1, r3], out[i2, r3], out[i3, r3] = a30 + b3, a31 + b3, a32 + b3, a33 + b3


@njit(parallel=True, fastmath=FASTMATH, nogil=True, cache=True, boundscheck=False)
def attention_bidir(out, qkv, start, length, n_head, head_dim):
    """out (N, n_head*head_dim) <- bidirectional multi-head attention within each sequence.

    qkv (N, 3 D) float32 holds [Q | K | V] (bias included) for the N real tokens; start / length int64
    (B,) are the sequences' first row and real length. Query i of sequence b, head h attends to the keys
    of rows ``start[b] .. start[b] + length[b] - 1`` only: the key padding mask. ``scores = (q . k) *
    (1 / sqrt(head_dim))``; softmax subtracts the row max and accumulates in float32.

    Parallel over (sequence, head); each task copies its K (transposed, (head_dim, L)) and V (L, head_dim)
    to contiguous scratch so the score loop runs over keys innermost (vectorized, no horizontal sums),
    then loops over its queries. A query's arithmetic depends only on its own sequence.
    """
    B = start.shape[0]
    D = n_head * head_dim
    scale = np.float32(1.0 / np.sqrt(head_dim))
    for task_u in prange(B * n_head):
        task = np.int64(task_u)
        b = task // n_head
        h = task - b * n_head
        s0 = start[b]
        L = length[b]
        if L == 0:
            continue
        qo = h * head_dim
        kt = np.empty((head_dim, L), np.float32)
        v = np.empty((L, head_dim), np.float32)
        for j in range(L):
            for d in range(head_dim):
                kt[d, j] = qkv[s0 + j, D + qo + d]
                v[j, d] = qkv[s0 + j, 2 * D + qo + d]
        sc = np.empty(L, np.float32)
        acc = np.empty(head_dim, np.float32)
        for i in range(L):
            for j in range(L):
                sc[j] = 0.0
            for d in range(head_dim):
                qd = qkv[s0 + i, qo + d]
                for j in range(L):
                    sc[j] += qd * kt[d, j]
            mx = np.float32(-np.inf)
            for j in range(L):
                sc[j] *= scale
                mx = max(mx, sc[j])
            tot = np.float32(0.0)
            for j in range(L):
                e = np.exp(sc[j] - mx)
                sc[j] = e
                tot += e
            inv = np.float32(1.0) / tot
            for d in range(head_dim):
                acc[d] = 0.0
            for j in range(L):
                wj = sc[j] * inv
                for d in range(head_dim):
                    acc[d] += wj * v[j, d]
            for d in range(head_dim):
                out[s0 + i, qo + d] = acc[d]


@njit(parallel=True, fastmath=FASTMATH, nogil=True, cache=True, boundscheck=False)
def mean_pool(out, x, start, length):
    """out (B, D) <- mean of rows start[b] .. start[b]+length[b]-1 of x (N, D), summed in float64.

    sentence-transformers ``Pooling(pooling_mode_mean_tokens)``: ``sum(h * mask) / max(sum(mask), 1e-9)``.
    """
    B = out.shape[0]
    D = x.shape[1]
    for b in prange(B):
        acc = np.zeros(D, np.float64)
        for j in range(length[b]):
            for i in range(D):
                acc[i] += np.float64(x[start[b] + j, i])
        c = max(np.float64(length[b]), 1e-9)
        for i in range(D):
            out[b, i] = np.float32(acc[i] / c)
