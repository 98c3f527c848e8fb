"""Causal grouped-query attention over a preallocated KV cache.

For query head h (KV head ``h // n_rep``, GQA: Ainslie et al. 2023) at absolute position p:
``softmax(q_h . K[0..p] / sqrt(head_dim)) @ V[0..p]`` (Vaswani et al. 2017; llama.cpp
``build_attn`` kq -> kq_soft_max -> kqv; HF ``eager_attention_forward``). Softmax subtracts the
row max and accumulates in float32.

KV cache layout: ``k_cache[seq, layer, pos, kv_head * head_dim + d]`` float32 (n_seq, n_layer, n_ctx, kv_dim):
one cache per sequence, stacked (a single sequence passes ``k[None]``). :func:`attention` takes each token's
sequence and position (a prefill or a batched decode step of several sequences); :func:`attention_blas`, the
prefill path, one sequence's (n_layer, n_ctx, kv_dim) cache and consecutive positions pos0..pos0+T-1.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from apr_numba.arch.faults import F_ATTN_SCALE, F_CAUSAL_MASK_OFF, F_GQA_MAP, F_SOFTMAX_NO_MAX
from apr_numba.runtime import FASTMATH, clone_function

_F16_MAX = np.float32(65504.0)


@njit(fastmath=FASTMATH, error_model="numpy", nogil=True, cache=True, boundscheck=False)
def store_kv(k_cache, v_cache, layer, seq, pos, qkv, q_dim, kv_dim):
    """Copy the K and V rows of qkv (T, q_dim + 2 kv_dim) into the cache: token t of sequence seq[t] at
    position pos[t] (k_cache, v_cache float32 (n_seq, n_layer, n_ctx, kv_dim); seq, pos int64 (T,))."""
    T = qkv.shape[0]
    for t in range(T):
        s = seq[t]
        p = pos[t]
        for i in range(kv_dim):
            k_cache[s, layer, p, i] = qkv[t, q_dim + i]
            v_cache[s, layer, p, i] = qkv[t, q_dim + kv_dim + i]


@njit(fastmath=FASTMATH, error_model="numpy", nogil=True, cache=True, boundscheck=False)
def attention_task(out, qkv, k_cache, v_cache, layer, seq, pos, kv_end, n_head, n_rep, head_dim, window, faults,
                   scores_cap, probs_cap, task):
    """Task ``task`` = t * n_head + h of :func:`_attention`: query head h of token t (same arguments). The
    parallel kernel and the persistent-worker decode (:mod:`apr_numba.backends.cpu_decode`) both run it."""
    n_kv = k_cache.shape[3] // head_dim
    scale = np.float32(1.0) if faults[F_ATTN_SCALE] else np.float32(1.0 / np.sqrt(head_dim))
    capture = scores_cap.shape[0] > 0
    t = task // n_head
    h = task - t * n_head
    sq = seq[t]
    pt = pos[t]
    kvh = h // n_rep
    if faults[F_GQA_MAP]:
        kvh = (kvh + 1) % n_kv
    kvo = kvh * head_dim
    qo = h * head_dim
    n = kv_end[t] if faults[F_CAUSAL_MASK_OFF] else pt + 1
    lo = 0
    if window > 0 and not faults[F_CAUSAL_MASK_OFF]:
        lo = max(0, pt - window + 1)
    scores = np.empty(n, np.float32)
    mx = np.float32(-np.inf)
    for p in range(lo, n):
        acc = np.float32(0.0)
        for d in range(head_dim):
            acc += qkv[t, qo + d] * k_cache[sq, layer, p, kvo + d]
        acc *= scale
        scores[p] = acc
        if acc > mx:
            mx = acc
    if capture:  # attn_scores is defined before the mask: keys before a sliding window are shown too
        for p in range(lo):
            acc = np.float32(0.0)
            for d in range(head_dim):
                acc += qkv[t, qo + d] * k_cache[sq, layer, p, kvo + d]
            scores_cap[h, t, p] = acc * scale
        for p in range(lo, n):
            scores_cap[h, t, p] = scores[p]
    if faults[F_SOFTMAX_NO_MAX]:
        mx = np.float32(0.0)
    tot = np.float32(0.0)
    for p in range(lo, n):
        e = np.exp(scores[p] - mx)
        if faults[F_SOFTMAX_NO_MAX] and e > _F16_MAX:
            e = np.float32(np.inf)
        scores[p] = e
        tot += e
    inv = np.float32(1.0) / tot
    for d in range(head_dim):
        out[t, qo + d] = 0.0
    for p in range(lo, n):
        w = scores[p] * inv
        if capture:
            probs_cap[h, t, p] = w
        for d in range(head_dim):
            out[t, qo + d] += w * v_cache[sq, layer, p, kvo + d]


def _attention(out, qkv, k_cache, v_cache, layer, seq, pos, kv_end, n_head, n_rep, head_dim, window, faults,
               scores_cap, probs_cap):
    """out (T, n_head*head_dim) <- causal GQA attention of the Q part of qkv (T, *), one query per token.

    Token t is at position pos[t] of sequence seq[t] and reads that sequence's cache,
    ``k_cache[seq[t], layer, :pos[t] + 1]`` (llama.cpp's ubatch with per-token ``pos`` and ``seq_id``: a
    prefill is T consecutive positions of one sequence, a batched decode step one token of each of T
    sequences). Keys/values of every token must already be in the cache (:func:`store_kv`). Parallel over
    (t, head).

    Args:
        k_cache, v_cache: float32 (n_seq, n_layer, n_ctx, kv_dim).
        seq, pos: int64 (T,) each token's sequence (first index of the cache) and position.
        kv_end: int64 (T,) the positions sequence seq[t] holds after this call (max pos of its tokens + 1):
            what a query sees with F_CAUSAL_MASK_OFF.
        window: sliding attention window in positions (0 = full causal attention): query at position q sees
            keys k with q - window < k <= q (llama.cpp LLAMA_SWA_TYPE_STANDARD, HF ``sliding_window``).
        faults: int64 (N_FAULTS,) teaching-fault flags of this layer (apr_numba.arch.stages): F_ATTN_SCALE
            drops 1/sqrt(head_dim); F_CAUSAL_MASK_OFF lets every query see all kv_end[t] keys; F_GQA_MAP maps
            head h to KV head (h // n_rep + 1) % n_kv; F_SOFTMAX_NO_MAX skips the max subtraction and
            overflows like float16 (exp > 65504 -> inf).
        scores_cap, probs_cap: float32 (n_head, T, nk) with nk >= max(kv_end) to capture the scaled scores
            (before the mask) and the softmax (zeros where masked), or (0, 0, 0) arrays to skip.
    """
    T = qkv.shape[0]
    for task_u in prange(T * n_head):
        attention_task(out, qkv, k_cache, v_cache, layer, seq, pos, kv_end, n_head, n_rep, head_dim, window, faults,
                       scores_cap, probs_cap, np.int64(task_u))


_attention_parallel = njit(parallel=True, fastmath=FASTMATH, error_model="numpy", nogil=True, cache=True,
                           boundscheck=False)(_attention)
_attention_serial = njit(fastmath=FASTMATH, error_model="numpy", nogil=True, cache=True, boundscheck=False)(
    clone_function(_attention, "_attention_serial"))
# Decode attention below this many multiply-adds (n_head * keys * head_dim * 2) runs without a parallel region.
MIN_PARALLEL_ATTN = 400_000


@njit(fastmath=FASTMATH, error_model="numpy", nogil=True, cache=True)
def attention(out, qkv, k_cache, v_cache, layer, seq, pos, kv_end, n_head, n_rep, head_dim, window, faults,
              scores_cap, probs_cap):
    """Causal GQA attention, one query per token at its own position and sequence (see :func:`_attention`);
    small problems skip the parallel region."""
    keys = 0
    for t in range(pos.shape[0]):
        keys += pos[t] + 1
    if keys * n_head * head_dim * 2 < MIN_PARALLEL_ATTN:
        _attention_serial(out, qkv, k_cache, v_cache, layer, seq, pos, kv_end, n_head, n_rep, head_dim, window,
                          faults, scores_cap, probs_cap)
    else:
        _attention_parallel(out, qkv, k_cache, v_cache, layer, seq, pos, kv_end, n_head, n_rep, head_dim, window,
                            faults, scores_cap, probs_cap)


@njit(parallel=True, fastmath=FASTMATH, error_model="numpy", nogil=True, cache=True, boundscheck=False)
def _mask_softmax_rows(S, T, pos0, causal, no_max, window):
    """In place: rows of S (n_rep*T, nk) become softmax probabilities; row r is query t = r % T at pos0 + t.

    Masked keys (p > pos0 + t when causal; p <= pos0 + t - window with a sliding window) get probability 0.
    ``no_max``: the F_SOFTMAX_NO_MAX fault.
    """
    nk = S.shape[1]
    for r_u in prange(S.shape[0]):
        r = np.int64(r_u)
        t = r % T
        n = pos0 + t + 1 if causal else nk
        lo = max(0, pos0 + t - window + 1) if causal and window > 0 else 0
        mx = np.float32(0.0)
        if not no_max:
            mx = np.float32(-np.inf)
            for p in range(lo, n):
                if S[r, p] > mx:
                    mx = S[r, p]
        tot = np.float32(0.0)
        for p in range(lo, n):
            e = np.exp(S[r, p] - mx)
            if no_max and e > _F16_MAX:
                e = np.float32(np.inf)
            S[r, p] = e
            tot += e
        inv = np.float32(1.0) / tot
        for p in range(lo, n):
            S[r, p] *= inv
        for p in range(lo):
            S[r, p] = 0.0
        for p in range(n, nk):
            S[r, p] = 0.0


@njit(fastmath=FASTMATH, error_model="numpy", nogil=True, cache=True)
def attention_blas(out, qkv, k_cache, v_cache, layer, pos0, n_head, n_rep, head_dim, window, faults, scores_cap,
                   probs_cap):
    """:func:`attention` for a prefill of one sequence, computed per KV head with two BLAS sgemms.

    k_cache, v_cache: that sequence's float32 (n_layer, n_ctx, kv_dim); the T queries are at positions
    pos0..pos0+T-1 (captures (n_head, T, pos0+T)); the other arguments as :func:`attention`. The n_rep
    query heads sharing a KV head are stacked, S = Q K^T / sqrt(head_dim)
    ((n_rep*T, nk), one sgemm), masked softmax per row, O = P V (one sgemm). O(T * nk) scratch per KV head.
    """
    T = qkv.shape[0]
    nk = pos0 + T
    n_kv = k_cache.shape[2] // head_dim
    scale = np.float32(1.0) if faults[F_ATTN_SCALE] else np.float32(1.0 / np.sqrt(head_dim))
    causal = not faults[F_CAUSAL_MASK_OFF]
    capture = scores_cap.shape[0] > 0
    Q = np.empty((n_rep * T, head_dim), np.float32)
    for kv in range(n_kv):
        src = (kv + 1) % n_kv if faults[F_GQA_MAP] else kv  # F_GQA_MAP: heads of group kv read KV head kv+1
        K = np.ascontiguousarray(k_cache[layer, :nk, src * head_dim:(src + 1) * head_dim])
        V = np.ascontiguousarray(v_cache[layer, :nk, src * head_dim:(src + 1) * head_dim])
        for i in range(n_rep):
            h = kv * n_rep + i
            for t in range(T):  # explicit loops: a slice assignment compiles Numba's shape-error path (~3 s)
                for d in range(head_dim):
                    Q[i * T + t, d] = qkv[t, h * head_dim + d]
        S = np.dot(Q, K.T) * scale  # (n_rep*T, nk)
        if capture:
            for i in range(n_rep):
                for t in range(T):
                    n = pos0 + t + 1 if causal else nk
                    for p in range(n):  # before the mask (a sliding window included), as the stage says
                        scores_cap[kv * n_rep + i, t, p] = S[i * T + t, p]
        _mask_softmax_rows(S, T, pos0, causal, faults[F_SOFTMAX_NO_MAX] != 0, window)
        if capture:
            for i in range(n_rep):
                for t in range(T):
                    for p in range(nk):
                        probs_cap[kv * n_rep + i, t, p] = S[i * T + t, p]
        O = np.dot(S, V)  # (n_rep*T, head_dim)
        for i in range(n_rep):
            h = kv * n_rep + i
            for t in range(T):
                for d in range(head_dim):
                    out[t, h * head_dim + d] = O[i * T + t, d]
