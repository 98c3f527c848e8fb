"""Causal GQA attention: the per-(token, head) kernel and the BLAS prefill path against a NumPy oracle, and the
per-token kernel on a batched decode step (tokens of several sequences at their own positions)."""

from __future__ import annotations

import numpy as np
import pytest

from apr_numba.arch.faults import FAULT_ID, N_FAULTS
from apr_numba.kernels.attention import attention, attention_blas

N_HEAD, N_KV, HD = 6, 2, 16


def naive(qkv, K, V, pos0, scale=True, causal=True, gqa_shift=0, window=0):
    """Float64 oracle: softmax(q k^T / sqrt(hd), causal) v per query head (HF eager_attention_forward); with a
    sliding window, query position q sees keys k with q - window < k <= q (HF ``sliding_window``)."""
    T = qkv.shape[0]
    nk = pos0 + T
    out = np.zeros((T, N_HEAD * HD))
    rep = N_HEAD // N_KV
    for h in range(N_HEAD):
        kv = (h // rep + gqa_shift) % N_KV
        q = qkv[:, h * HD:(h + 1) * HD].astype(np.float64)
        k = K[:nk, kv * HD:(kv + 1) * HD].astype(np.float64)
        v = V[:nk, kv * HD:(kv + 1) * HD].astype(np.float64)
        s = q @ k.T / (np.sqrt(HD) if scale else 1.0)
        if causal:
            qp, kp = pos0 + np.arange(T)[:, None], np.arange(nk)[None, :]
            s = np.where((kp <= qp) & ((window == 0) | (qp - kp < window)), s, -np.inf)
        p = np.exp(s - s.max(1, keepdims=True))
        out[:, h * HD:(h + 1) * HD] = (p / p.sum(1, keepdims=True)) @ v
    return out


def per_token(out, qkv, kc, vc, layer, pos0, *rest):
    """The per-token kernel called as a prefill of one sequence (T tokens at pos0..pos0+T-1)."""
    T = qkv.shape[0]
    attention(out, qkv, kc[None], vc[None], layer, np.zeros(T, np.int64), pos0 + np.arange(T, dtype=np.int64),
              np.full(T, pos0 + T, np.int64), *rest)


def _inputs(seed: int, T: int, pos0: int, n_ctx: int):
    """Random qkv (T, q + 2 kv) and a one-layer KV cache filled at positions 0..pos0+T-1."""
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((T, (N_HEAD + 2 * N_KV) * HD)).astype(np.float32)
    kc = np.zeros((1, n_ctx, N_KV * HD), np.float32)
    vc = np.zeros_like(kc)
    kc[0, :pos0 + T] = rng.standard_normal((pos0 + T, N_KV * HD))
    vc[0, :pos0 + T] = rng.standard_normal((pos0 + T, N_KV * HD))
    return qkv, kc, vc


@pytest.mark.parametrize("pos0", [0, 5])
@pytest.mark.parametrize("fault", [None, "attn-scale", "causal-mask-off", "gqa-map"])
@pytest.mark.parametrize("kernel", [per_token, attention_blas], ids=["per-head", "blas"])
def test_attention_matches_oracle(kernel, fault, pos0):
    T = 20
    qkv, kc, vc = _inputs(pos0, T, pos0, 64)
    flags = np.zeros(N_FAULTS, np.int64)
    if fault:
        flags[FAULT_ID[fault]] = 1
    out = np.empty((T, N_HEAD * HD), np.float32)
    sc = np.zeros((N_HEAD, T, pos0 + T), np.float32)
    pc = np.zeros_like(sc)
    kernel(out, qkv, kc, vc, 0, pos0, N_HEAD, N_HEAD // N_KV, HD, 0, flags, sc, pc)
    ref = naive(qkv, kc[0], vc[0], pos0, scale=fault != "attn-scale", causal=fault != "causal-mask-off",
                gqa_shift=1 if fault == "gqa-map" else 0)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    # the captured softmax rows sum to 1 and are zero above the causal diagonal
    np.testing.assert_allclose(pc.sum(-1), 1.0, rtol=1e-5)
    if fault != "causal-mask-off":
        t, p = np.nonzero(np.ones((T, pos0 + T)))
        above = p > pos0 + t
        assert np.all(pc[:, t[above], p[above]] == 0)


@pytest.mark.parametrize("pos0, window", [(0, 4), (5, 4), (5, 1), (0, 64)])
@pytest.mark.parametrize("kernel", [per_token, attention_blas], ids=["per-head", "blas"])
def test_sliding_window_attention_matches_oracle(kernel, pos0, window):
    T = 12
    qkv, kc, vc = _inputs(7 + pos0, T, pos0, 32)
    out = np.empty((T, N_HEAD * HD), np.float32)
    sc = np.zeros((N_HEAD, T, pos0 + T), np.float32)
    pc = np.zeros_like(sc)
    kernel(out, qkv, kc, vc, 0, pos0, N_HEAD, N_HEAD // N_KV, HD, window, np.zeros(N_FAULTS, np.int64), sc, pc)
    np.testing.assert_allclose(out, naive(qkv, kc[0], vc[0], pos0, window=window), rtol=1e-4, atol=1e-5)
    t, p = np.nonzero(np.ones((T, pos0 + T)))
    outside = (p > pos0 + t) | (pos0 + t - p >= window)
    assert np.all(pc[:, t[outside], p[outside]] == 0) and np.allclose(pc.sum(-1), 1.0, rtol=1e-5)
    # attn_scores are the scaled scores before the mask: keys before the window shown, the future zero
    for h in range(N_HEAD):
        kvh = h // (N_HEAD // N_KV)
        full = qkv[:, h * HD:(h + 1) * HD] @ kc[0, :pos0 + T, kvh * HD:(kvh + 1) * HD].T / np.sqrt(HD)
        np.testing.assert_allclose(sc[h], np.where(p.reshape(T, -1) <= pos0 + t.reshape(T, -1), full, 0),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window", [0, 4])
def test_batched_decode_step_matches_oracle(window):
    """One query per sequence, each at its own position in its own cache (a batched decode step); a second
    token of sequence 1 in the same call sees the first (causal within the call)."""
    rng = np.random.default_rng(11 + window)
    n_seq, n_ctx = 3, 32
    seq = np.array([0, 1, 2, 1], np.int64)
    pos = np.array([4, 9, 0, 10], np.int64)
    T = seq.size
    kc = rng.standard_normal((n_seq, 1, n_ctx, N_KV * HD)).astype(np.float32)
    vc = rng.standard_normal((n_seq, 1, n_ctx, N_KV * HD)).astype(np.float32)
    qkv = rng.standard_normal((T, (N_HEAD + 2 * N_KV) * HD)).astype(np.float32)
    kv_end = np.array([5, 11, 1, 11], np.int64)
    out = np.empty((T, N_HEAD * HD), np.float32)
    no = np.zeros((0, 0, 0), np.float32)
    attention(out, qkv, kc, vc, 0, seq, pos, kv_end, N_HEAD, N_HEAD // N_KV, HD, window, np.zeros(N_FAULTS, np.int64),
              no, no)
    for t in range(T):  # the oracle of one query at pos[t] against sequence seq[t]'s cache
        ref = naive(qkv[t:t + 1], kc[seq[t], 0], vc[seq[t], 0], int(pos[t]), window=window)
        np.testing.assert_allclose(out[t], ref[0], rtol=1e-4, atol=1e-5)
