"""Decode on persistent workers: one parallel region per forward call instead of one per product (issue 14).

:func:`~apr_numba.backends.cpu_forward.forward` opens a Numba parallel region for each matrix product (TBB
launches and joins it: ~10-15 us each), so a decode step of a 30-layer model pays for ~100 of them, and the
small products (Q, K, V, the attention output of smollm2) ran on one core because a region cost more than they
did. :func:`forward_workers` runs the same decoder step (the same kernels in the same order, so the same
float32 results up to rounding) inside ONE ``prange`` over the workers. Each step of the layer is a list of
tasks claimed from an atomic counter, and a worker moves on when the step's tasks are all done
(:mod:`apr_numba.kernels.sync`,
llama.cpp's threadpool with ``ggml_barrier`` in ``ggml-cpu.c``). Per layer::

    rows:   x += o (post-norm), h = rmsnorm(x) * attn_norm (int8 blocks of h)     # post_ffn_residual, attn_norm
    tasks:  qkv = h @ [Wq; Wk; Wv].T          one per row group                     # qkv_matmul
    rows:   + bias, QK-norm, RoPE, K/V into the cache                               # qkv_bias .. k_post_rope
    tasks:  attention, one per (token, query head)                                  # attention
    rows:   int8 blocks of the attention output (int8 mode only)
    tasks:  o = att @ Wo.T                                                          # attn_out
    rows:   post-norm, x += o, h = rmsnorm(x) * ffn_norm                            # post_attn_residual, ffn_norm
    tasks:  gu = h @ [Wg; Wu].T                                                     # ffn_gate, ffn_up
    rows:   act = silu(g) * u  (or gelu_tanh)                                       # ffn_swigl
    tasks:  o = act @ Wd.T                                                          # ffn_out

("rows": one task per token row, so a batched decode step spreads them too), then the final norm and the LM
head. The tasks are the ones the region-per-product path runs
(:func:`~apr_numba.kernels.matmul.product_task`, :func:`~apr_numba.kernels.attention.attention_task`), so there
is one definition of each piece of arithmetic; this module only orders them. The two paths agree to float32
rounding (compiled into different callers, fast-math may reassociate a sum differently); any number of workers
gives the same bits (each output element is computed by one task).

It serves the calls without tracing, teaching faults or experts, with fewer than
:data:`~apr_numba.kernels.matmul.BLAS_MIN_T` tokens (decode, batched decode, short prompts); everything else
runs :func:`~apr_numba.backends.cpu_forward.forward`. :func:`applies` says which. ``APR_NUMBA_WORKERS=0``
turns it off (the region-per-product path for every call).
"""

from __future__ import annotations

import os

import numba
import numpy as np
from numba import njit, prange

from apr_numba.arch.faults import N_FAULTS
from apr_numba.backends.cpu_forward import (
    ACT,
    EMBED_SCALE,
    EPS,
    FINAL_SOFTCAP,
    HAS_BIAS,
    HEAD_DIM,
    N_EMBD,
    N_EXPERT,
    N_FF,
    N_HEAD,
    N_HEAD_KV,
    POST_ATTN_NORM,
    POST_FFN_NORM,
    QK_NORM,
    ROPE_TYPE,
    dims,
    forward,
    kv_ends,
)
from apr_numba.kernels.attention import attention_task, store_kv
from apr_numba.kernels.embed import embed_tokens
from apr_numba.kernels.matmul import BLAS_MIN_T, needs_q8, product_task, product_tasks, q8_buffers
from apr_numba.kernels.norm import add_inplace, geglu, rmsnorm, rmsnorm_heads, scale_inplace, softcap_inplace, swiglu
from apr_numba.kernels.rope import rope_inplace
from apr_numba.kernels.sync import claim, finish, wait_done
from apr_numba.kernels.vnni import quantize_x8
from apr_numba.runtime import FASTMATH

STEPS_PER_LAYER = 10
# Below this many multiply-adds per layer and call, one worker runs the call (no cross-core synchronisation):
# the break-even of ~10 us of synchronisation per layer against halving the products (~14 GMAC/s a core).
MIN_LAYER_MACS = 300_000


def enabled() -> bool:
    """False when ``APR_NUMBA_WORKERS=0`` (every call then opens a region per product)."""
    return os.environ.get("APR_NUMBA_WORKERS", "1").strip() != "0"


def applies(n_tokens: int, cfg: tuple, dbg: tuple, no_debug: tuple) -> bool:
    """True when :func:`forward_workers` serves this call: fewer than BLAS_MIN_T tokens, no experts, the
    model's default ``dbg`` (no tracing, no teaching fault). Layer capture (the dashboard's) is served."""
    return enabled() and n_tokens < BLAS_MIN_T and int(cfg[N_EXPERT]) == 0 and dbg is no_debug


def n_workers_for(n_tokens: int, cfg: tuple) -> int:
    """Workers for a call of ``n_tokens``: all of Numba's threads, or 1 when a layer's products are under
    :data:`MIN_LAYER_MACS` multiply-adds for the call (each of a layer's 10 steps costs ~1 us of cross-core
    synchronisation with 2 workers; measured with gate WS-001's minimal model, AMD EPYC: 0.50 ms a step on 1
    worker, 0.76-0.82 on 2)."""
    D, n_head, n_kv, hd, n_ff = (int(cfg[i]) for i in (N_EMBD, N_HEAD, N_HEAD_KV, HEAD_DIM, N_FF))
    layer = D * (n_head + 2 * n_kv) * hd + n_head * hd * D + 3 * D * n_ff
    return 1 if n_tokens * layer < MIN_LAYER_MACS else numba.get_num_threads()


def run_forward(tokens, pos, seq, cfg, fp, w, rope, k_cache, v_cache, logits, cap, dbg, no_debug) -> None:
    """One CPU forward call with :func:`~apr_numba.backends.cpu_forward.forward`'s arguments (``cap`` is its
    ``layer_out``): :func:`forward_workers` on :func:`n_workers_for` workers when :func:`applies` (``dbg``
    is the model's default ``no_debug``), else ``forward``."""
    if applies(tokens.shape[0], cfg, dbg, no_debug):
        forward_workers(tokens, pos, seq, cfg, fp, w, rope, k_cache, v_cache, logits, cap,
                        np.int64(n_workers_for(tokens.shape[0], cfg)))
    else:
        forward(tokens, pos, seq, cfg, fp, w, rope, k_cache, v_cache, logits, cap, dbg)


@njit(fastmath=FASTMATH, error_model="numpy", nogil=True, cache=True, boundscheck=False)
def _products(ctr, s, out, X, w0, w1, w2, n_mats, xq):
    """Claim and run product tasks of step ``s`` until none are left, then wait for the step to finish."""
    n = product_tasks(w0, w1, w2, n_mats)
    i = claim(ctr, s)
    while i < n:
        product_task(out, X, w0, w1, w2, n_mats, i, xq)
        finish(ctr, s)
        i = claim(ctr, s)
    wait_done(ctr, s, n)


@njit(fastmath=FASTMATH, error_model="numpy", nogil=True, cache=True, boundscheck=False)
def _quantize_row(xq, X, t, q8):
    """Row t of X into its int8 blocks (:func:`~apr_numba.kernels.vnni.quantize_x8`) when ``q8``."""
    if q8:
        r = slice(t, t + 1)
        quantize_x8(X[r], xq[0][r], xq[1][r], xq[2][r], xq[3][r])


@njit(fastmath=FASTMATH, error_model="numpy", nogil=True, cache=True)
def _scratch(tokens, pos, seq, cfg, mats, logits):
    """(step counters, activation buffers, the int8 blocks of the four product inputs) of one
    :func:`forward_workers` call (tuples of arrays one level deep: a parfor takes no deeper nesting)."""
    T = tokens.shape[0]
    L, D, n_head, n_kv, hd, n_ff, q_dim, kv_dim, _ = dims(cfg)
    kv_end, _ = kv_ends(pos, seq)  # positions of seq[t] after this call (only read under a teaching fault)
    x = np.empty((T, D), np.float32)
    h = np.empty((T, D), np.float32)
    o = np.empty((T, D), np.float32)
    qkv = np.empty((T, q_dim + 2 * kv_dim), np.float32)
    att = np.empty((T, q_dim), np.float32)
    gu = np.empty((T, 2 * n_ff), np.float32)
    act = np.empty((T, n_ff), np.float32)
    n_out = logits.shape[0]
    hf = np.empty((n_out, D), np.float32)
    head = mats[7 * L]
    q8_h = needs_q8(head, head, head, np.int64(1))
    q8 = q8_h  # int8 blocks are needed when any matrix is a VNNI layout (layers may mix types)
    for i in range(7 * L):
        q8 = q8 or needs_q8(mats[i], mats[i], mats[i], np.int64(1))
    xq_d = q8_buffers(h, q8)
    xq_o = q8_buffers(att, q8)
    xq_f = q8_buffers(act, q8)
    xq_h = q8_buffers(hf, q8_h)
    no_faults = np.zeros(N_FAULTS, np.int64)
    no_cap = np.zeros((0, 0, 0), np.float32)
    ctr = np.zeros(2 * (STEPS_PER_LAYER * L + 4), np.int64)
    bufs = (kv_end, x, h, o, qkv, att, gu, act, hf, no_faults, no_cap)
    return ctr, bufs, xq_d, xq_o, xq_f, xq_h


@njit(fastmath=FASTMATH, error_model="numpy", nogil=True, cache=True, boundscheck=False)
def _worker(ctr, bufs, xq_d, xq_o, xq_f, xq_h, tokens, pos, seq, cfg, fp, w, rope, k_cache, v_cache, logits,
            layer_out):
    """One worker's walk through the steps of :func:`forward_workers` (the body of its ``prange``, a function
    of its own: a parfor takes no nested tuples of arrays and its passes stay on a one-line loop body). The
    row-wise steps (norms, RoPE and the KV write, the activation, int8 blocks) are one task per token row."""
    (mats, embd_raw, embd_type, attn_norm, ffn_norm, bias_qkv, output_norm, q_norm, k_norm, pa_norm, pf_norm,
     experts) = w
    rope_cos_all, rope_sin_all, rope_layer, layer_window = rope
    kv_end, x, h, o, qkv, att, gu, act, hf, no_faults, no_cap = bufs
    eps = fp[EPS]
    T = tokens.shape[0]
    L, _, n_head, n_kv, hd, n_ff, q_dim, kv_dim, n_rep = dims(cfg)
    n_out = logits.shape[0]
    head = mats[7 * L]
    s = np.int64(0)
    q8_h = needs_q8(head, head, head, np.int64(1))
    for layer in range(L):
        m0 = 7 * layer
        # which product inputs need int8 blocks: this layer's matrices (a file may mix types across layers)
        q8_qkv = needs_q8(mats[m0], mats[m0 + 1], mats[m0 + 2], np.int64(3))
        q8_o = needs_q8(mats[m0 + 3], mats[m0 + 3], mats[m0 + 3], np.int64(1))
        q8_gu = needs_q8(mats[m0 + 4], mats[m0 + 5], mats[m0 + 5], np.int64(2))
        q8_f = needs_q8(mats[m0 + 6], mats[m0 + 6], mats[m0 + 6], np.int64(1))
        # the previous layer's FFN residual (or the embedding), then attn_norm; one task per token row
        t = claim(ctr, s)
        while t < T:
            r = slice(t, t + 1)
            if layer == 0:
                embed_tokens(x[r], embd_raw, tokens[r], embd_type)
                if fp[EMBED_SCALE] != 1.0:
                    scale_inplace(x[r], np.float32(fp[EMBED_SCALE]))
            else:
                if cfg[POST_FFN_NORM]:
                    rmsnorm(o[r], o[r], pf_norm[layer - 1], eps)
                add_inplace(x[r], o[r])
                if layer_out.shape[0] > 0:
                    layer_out[layer - 1, t] = x[t]
            rmsnorm(h[r], x[r], attn_norm[layer], eps)
            _quantize_row(xq_d, h, t, q8_qkv)
            finish(ctr, s)
            t = claim(ctr, s)
        wait_done(ctr, s, T)
        s += 1
        _products(ctr, s, qkv, h, mats[m0], mats[m0 + 1], mats[m0 + 2], np.int64(3), xq_d)
        s += 1
        t = claim(ctr, s)  # bias, QK-norm, RoPE, the KV cache write: per token row
        while t < T:
            r = slice(t, t + 1)
            if cfg[HAS_BIAS]:
                b = bias_qkv[layer]
                for i in range(q_dim + 2 * kv_dim):
                    qkv[t, i] += b[i]
            if cfg[QK_NORM]:
                rmsnorm_heads(qkv[r], 0, n_head, hd, q_norm[layer], eps)
                rmsnorm_heads(qkv[r], q_dim, n_kv, hd, k_norm[layer], eps)
            rc, rsn = rope_cos_all[rope_layer[layer]], rope_sin_all[rope_layer[layer]]
            rope_inplace(qkv[r], 0, n_head, hd, pos[r], rc, rsn, cfg[ROPE_TYPE])
            rope_inplace(qkv[r], q_dim, n_kv, hd, pos[r], rc, rsn, cfg[ROPE_TYPE])
            store_kv(k_cache, v_cache, layer, seq[r], pos[r], qkv[r], q_dim, kv_dim)
            finish(ctr, s)
            t = claim(ctr, s)
        wait_done(ctr, s, T)
        s += 1
        n_at = T * n_head
        i = claim(ctr, s)
        while i < n_at:
            attention_task(att, qkv, k_cache, v_cache, layer, seq, pos, kv_end, n_head, n_rep, hd,
                           layer_window[layer], no_faults, no_cap, no_cap, i)
            finish(ctr, s)
            i = claim(ctr, s)
        wait_done(ctr, s, n_at)
        s += 1
        if q8_o:  # int8 blocks of the attention output (every worker knows q8_o: all skip the step alike)
            t = claim(ctr, s)
            while t < T:
                _quantize_row(xq_o, att, t, q8_o)
                finish(ctr, s)
                t = claim(ctr, s)
            wait_done(ctr, s, T)
        s += 1
        _products(ctr, s, o, att, mats[m0 + 3], mats[m0 + 3], mats[m0 + 3], np.int64(1), xq_o)
        s += 1
        t = claim(ctr, s)  # post-norm, residual, ffn_norm
        while t < T:
            r = slice(t, t + 1)
            if cfg[POST_ATTN_NORM]:
                rmsnorm(o[r], o[r], pa_norm[layer], eps)
            add_inplace(x[r], o[r])
            rmsnorm(h[r], x[r], ffn_norm[layer], eps)
            _quantize_row(xq_d, h, t, q8_gu)
            finish(ctr, s)
            t = claim(ctr, s)
        wait_done(ctr, s, T)
        s += 1
        _products(ctr, s, gu, h, mats[m0 + 4], mats[m0 + 5], mats[m0 + 5], np.int64(2), xq_d)
        s += 1
        t = claim(ctr, s)  # SwiGLU / GeGLU
        while t < T:
            r = slice(t, t + 1)
            if cfg[ACT] == 1:
                geglu(act[r], gu[r], n_ff)
            else:
                swiglu(act[r], gu[r], n_ff)
            _quantize_row(xq_f, act, t, q8_f)
            finish(ctr, s)
            t = claim(ctr, s)
        wait_done(ctr, s, T)
        s += 1
        _products(ctr, s, o, act, mats[m0 + 6], mats[m0 + 6], mats[m0 + 6], np.int64(1), xq_f)
        s += 1
    # the last FFN residual, the final norm of the last n_out rows, the LM head
    t = claim(ctr, s)
    while t < T:
        r = slice(t, t + 1)
        if cfg[POST_FFN_NORM]:
            rmsnorm(o[r], o[r], pf_norm[L - 1], eps)
        add_inplace(x[r], o[r])
        if layer_out.shape[0] > 0:
            layer_out[L - 1, t] = x[t]
        j = t - (T - n_out)
        if j >= 0:
            rmsnorm(hf[j:j + 1], x[r], output_norm, eps)
            _quantize_row(xq_h, hf, j, q8_h)
        finish(ctr, s)
        t = claim(ctr, s)
    wait_done(ctr, s, T)
    s += 1
    if n_out > 0:
        _products(ctr, s, logits, hf, head, head, head, np.int64(1), xq_h)
    s += 1


@njit(parallel=True, fastmath=FASTMATH, error_model="numpy", nogil=True, cache=True)
def forward_workers(tokens, pos, seq, cfg, fp, w, rope, k_cache, v_cache, logits, layer_out, n_workers):
    """:func:`~apr_numba.backends.cpu_forward.forward` without ``dbg``, on ``n_workers`` persistent workers
    (int64 >= 1, normally ``numba.get_num_threads()``).

    Same arguments, shapes and results as ``forward`` for the calls :func:`applies` accepts (T < BLAS_MIN_T
    tokens, dense FFN): logits float32 (n_out, n_vocab) of the last n_out tokens, K/V written to the caches at
    [seq[t], :, pos[t]], each block's output (post_ffn_residual) in ``layer_out`` float32 (n_layer, T, n_embd)
    unless it is a (0, 0, 0) array. The results are the same bits whatever the number of workers (each output
    element is computed by exactly one task) and ``forward``'s to float32 rounding.
    """
    ctr, bufs, xq_d, xq_o, xq_f, xq_h = _scratch(tokens, pos, seq, cfg, w[0], logits)
    n_out = logits.shape[0]
    for wk in prange(n_workers):  # noqa: B007 - the worker index is not needed: tasks are claimed
        _worker(ctr, bufs, xq_d, xq_o, xq_f, xq_h, tokens, pos, seq, cfg, fp, w, rope, k_cache, v_cache, logits,
                layer_out)
    if n_out > 0 and fp[FINAL_SOFTCAP] > 0.0:
        softcap_inplace(logits, np.float32(fp[FINAL_SOFTCAP]))
