"""The decoder forward pass, compiled whole: one Python -> Numba call per prefill or decode step.

Reads like HF ``LlamaDecoderLayer.forward`` / llama2.c ``forward()``; each step names its aprender
trace stage (shared/docs/aprender-facts.md) and llama.cpp graph tensor:

    x = embed(tokens) (* embed_scale)                    # embedding      (inp_embd)
    for each layer:
        h   = rmsnorm(x) * attn_norm                     # attn_norm      (attn_norm)
        qkv = h @ [Wq; Wk; Wv].T (+ bias)                # qkv_matmul / qkv_bias (Qcur, Kcur, Vcur)
        (q, k = rmsnorm per head (QK-norm))
        rope(q), rope(k); cache k, v                     # q_post_rope, k_post_rope
        a   = softmax(q k^T / sqrt(hd), causal) v        # attn_scores, attn_softmax, attention (kqv)
        x   = x + (post_norm)(a @ Wo.T)                  # attn_out, post_attn_residual (ffn_inp)
        h   = rmsnorm(x) * ffn_norm                      # ffn_norm
        x   = x + (post_norm)((act(h Wg.T) * (h Wu.T)) @ Wd.T)  # ffn_gate, ffn_up, ffn_silu, ffn_swigl,
                                                         # ffn_out, post_ffn_residual (l_out)
    logits = (softcap)(rmsnorm(x) * output_norm @ W_out.T)  # final_norm (result_norm), lm_head (result_output)

The parenthesised steps and ``act`` (SwiGLU's silu or GeGLU's gelu_tanh) are the block features of the
model's :class:`~apr_numba.arch.spec.ArchSpec`, passed in as flags (:func:`cfg_tuple`, :func:`fp_tuple`):
one compiled function runs every architecture the spec describes (llama.cpp's graph builder does the same
per architecture in ``llama-model.cpp``). :data:`IMPLEMENTS` lists the features it executes.

Everything is preallocated by the caller except per-call activation buffers (a handful per call, not
per layer). The kernels release the GIL (``nogil=True``), so a UI thread keeps running.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from apr_numba.arch.faults import F_FFN_SWAP, F_QKV_BIAS_DROP, F_RMSNORM_EPS, F_ROPE_STYLE, F_ROPE_THETA
from apr_numba.arch.stages import (
    S_ATTENTION,
    S_ATTN_NORM,
    S_ATTN_OUT,
    S_ATTN_SCORES,
    S_ATTN_SOFTMAX,
    S_EMBEDDING,
    S_FFN_GATE,
    S_FFN_NORM,
    S_FFN_OUT,
    S_FFN_SILU,
    S_FFN_SWIGL,
    S_FFN_UP,
    S_FINAL_NORM,
    S_K_POST_ROPE,
    S_LM_HEAD,
    S_POST_ATTN_RESIDUAL,
    S_POST_FFN_RESIDUAL,
    S_Q_POST_ROPE,
    S_QKV_BIAS,
    S_QKV_MATMUL,
)
from apr_numba.kernels.attention import attention, attention_blas, store_kv
from apr_numba.kernels.embed import embed_tokens
from apr_numba.kernels.matmul import BLAS_MIN_T
from apr_numba.kernels.matmul import matmul_auto as matmul3
from apr_numba.kernels.norm import add_inplace, geglu, rmsnorm, rmsnorm_heads, scale_inplace, softcap_inplace, swiglu
from apr_numba.kernels.rope import rope_inplace
from apr_numba.runtime import FASTMATH

# cfg tuple fields (int64), built from the ArchSpec by :func:`cfg_tuple`
(N_LAYER, N_EMBD, N_HEAD, N_HEAD_KV, HEAD_DIM, N_FF, N_VOCAB, ROPE_TYPE, HAS_BIAS, QK_NORM, POST_ATTN_NORM,
 POST_FFN_NORM, ACT) = range(13)
# fp tuple fields (float): RMSNorm eps, embedding scale, final logit soft-cap (0 = off)
EPS, EMBED_SCALE, FINAL_SOFTCAP = range(3)
# implemented ArchSpec features (apr_numba.arch.traits.FEATURES)
IMPLEMENTS = frozenset({"qkv_bias", "qk_norm", "post_attn_norm", "post_ffn_norm", "gelu_tanh", "embed_scale",
                        "final_softcap", "rope_freqs"})


def cfg_tuple(spec) -> tuple:
    """The forward's int64 ``cfg`` tuple for an :class:`~apr_numba.arch.spec.ArchSpec`."""
    c = spec.hp
    return tuple(np.int64(v) for v in (c.n_layer, c.n_embd, c.n_head, c.n_head_kv, c.head_dim, c.n_ff, c.n_vocab,
                                       spec.rope_type, spec.qkv_bias, spec.qk_norm, spec.post_attn_norm,
                                       spec.post_ffn_norm, spec.activation))


def fp_tuple(spec) -> tuple:
    """The forward's float ``fp`` tuple (eps, embedding scale, final soft-cap) for an ArchSpec."""
    return (float(spec.hp.rms_eps), float(spec.embed_scale), float(spec.final_softcap))


@njit(nogil=True, cache=True, boundscheck=False)
def _cap(trace_off, trace_buf, stage, layer, a):
    """Copy a (T, W) into trace_buf at trace_off[stage, layer] when that stage is traced (offset >= 0)."""
    off = trace_off[stage, layer]
    if off < 0:
        return
    T, W = a.shape
    for t in range(T):
        for i in range(W):
            trace_buf[off + t * W + i] = a[t, i]


@njit(fastmath=FASTMATH, error_model="numpy", nogil=True, cache=True)
def forward(tokens, pos0, cfg, fp, w, rope, k_cache, v_cache, logits, layer_out, dbg):
    """Run the decoder on ``tokens`` (T,) int64 at positions pos0..pos0+T-1, filling the KV cache.

    Args:
        cfg: int64 tuple (:func:`cfg_tuple`): n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff, n_vocab,
            rope_type, has_bias, qk_norm, post_attn_norm, post_ffn_norm, activation.
        fp: float tuple (:func:`fp_tuple`): RMSNorm eps, embedding scale, final logit soft-cap (0 = off).
        w: weights tuple (``ModelWeights.kernel_args``): (mats, embd_raw, embd_type, attn_norm, ffn_norm,
            bias_qkv, output_norm, q_norm, k_norm, post_attn_norm, post_ffn_norm). ``mats`` is a typed List of
            packed matrices, 7 per layer then the LM head (see weights.LAYER_MATS); norms float32 (n_layer, n),
            (n_layer, 0) when the model has none.
        rope: (cos, sin, layer_table): float32 (n_tables, n_ctx, head_dim/2) RoPE tables and int64 (n_layer,)
            the table of each layer (gemma3's local layers have their own base).
        k_cache, v_cache: float32 (n_layer, n_ctx, kv_dim), written at pos0..pos0+T-1.
        logits: float32 (n_out, n_vocab): filled with the logits of the last n_out positions (n_out may be 0).
        layer_out: float32 (n_layer, T, n_embd) to capture each block's output (post_ffn_residual), or
            a (0, 0, 0) array to skip the capture.
        dbg: tracing and teaching faults (apr_numba.arch.stages, apr_numba.arch.faults), a tuple
            (trace_off int64 (N_STAGES, n_layer), trace_buf float32 (n,), layer_fault int64 (n_layer, N_FAULTS),
            rope_cos_alt, rope_sin_alt (RoPE tables with the wrong base, for F_ROPE_THETA), eps_alt float).
            A stage is written to trace_buf[trace_off[stage, layer]:] as (T, width) row-major when its offset
            is >= 0 (attn_scores / attn_softmax as (n_head, T, pos0+T)); whole-model stages use layer 0.
    """
    mats, embd_raw, embd_type, attn_norm, ffn_norm, bias_qkv, output_norm, q_norm, k_norm, pa_norm, pf_norm = w
    rope_cos_all, rope_sin_all, rope_layer = rope
    eps = fp[EPS]
    trace_off, trace_buf, layer_fault, rope_cos_alt, rope_sin_alt, eps_alt = dbg
    T = tokens.shape[0]
    L = cfg[N_LAYER]
    D = cfg[N_EMBD]
    n_head = cfg[N_HEAD]
    n_kv = cfg[N_HEAD_KV]
    hd = cfg[HEAD_DIM]
    n_ff = cfg[N_FF]
    q_dim = n_head * hd
    kv_dim = n_kv * hd
    n_rep = n_head // n_kv
    nk = pos0 + T  # keys visible to the last query

    x = np.empty((T, D), np.float32)  # residual stream
    h = np.empty((T, D), np.float32)  # normed input of a sub-layer
    o = np.empty((T, D), np.float32)  # sub-layer output
    qkv = np.empty((T, q_dim + 2 * kv_dim), np.float32)
    att = np.empty((T, q_dim), np.float32)
    gu = np.empty((T, 2 * n_ff), np.float32)
    act = np.empty((T, n_ff), np.float32)
    no_cap = np.zeros((0, 0, 0), np.float32)

    embed_tokens(x, embd_raw, tokens, embd_type)
    if fp[EMBED_SCALE] != 1.0:
        scale_inplace(x, np.float32(fp[EMBED_SCALE]))
    _cap(trace_off, trace_buf, S_EMBEDDING, 0, x)
    for layer in range(L):
        m0 = 7 * layer
        fl = layer_fault[layer]
        leps = eps_alt if fl[F_RMSNORM_EPS] else eps
        # attention
        rmsnorm(h, x, attn_norm[layer], leps)
        _cap(trace_off, trace_buf, S_ATTN_NORM, layer, h)
        matmul3(qkv, h, mats[m0], mats[m0 + 1], mats[m0 + 2], 3)
        _cap(trace_off, trace_buf, S_QKV_MATMUL, layer, qkv)
        if cfg[HAS_BIAS] and not fl[F_QKV_BIAS_DROP]:
            b = bias_qkv[layer]
            for t in range(T):
                for i in range(q_dim + 2 * kv_dim):
                    qkv[t, i] += b[i]
        _cap(trace_off, trace_buf, S_QKV_BIAS, layer, qkv)
        rtype = cfg[ROPE_TYPE] ^ 2 if fl[F_ROPE_STYLE] else cfg[ROPE_TYPE]  # NORM 0 <-> NEOX 2
        if cfg[QK_NORM]:
            rmsnorm_heads(qkv, 0, n_head, hd, q_norm[layer], leps)
            rmsnorm_heads(qkv, q_dim, n_kv, hd, k_norm[layer], leps)
        if fl[F_ROPE_THETA]:
            rc, rs = rope_cos_alt, rope_sin_alt
        else:
            rc, rs = rope_cos_all[rope_layer[layer]], rope_sin_all[rope_layer[layer]]
        rope_inplace(qkv, 0, n_head, hd, pos0, rc, rs, rtype)
        rope_inplace(qkv, q_dim, n_kv, hd, pos0, rc, rs, rtype)
        _cap(trace_off, trace_buf, S_Q_POST_ROPE, layer, qkv[:, :q_dim])
        _cap(trace_off, trace_buf, S_K_POST_ROPE, layer, qkv[:, q_dim:q_dim + kv_dim])
        store_kv(k_cache, v_cache, layer, pos0, qkv, q_dim, kv_dim)
        so = trace_off[S_ATTN_SCORES, layer]
        po = trace_off[S_ATTN_SOFTMAX, layer]
        if so >= 0 and po >= 0:
            n3 = n_head * T * nk
            sc = trace_buf[so:so + n3].reshape((n_head, T, nk))
            pc = trace_buf[po:po + n3].reshape((n_head, T, nk))
            sc[:] = 0.0
            pc[:] = 0.0
            if T >= BLAS_MIN_T:
                attention_blas(att, qkv, k_cache, v_cache, layer, pos0, n_head, n_rep, hd, fl, sc, pc)
            else:
                attention(att, qkv, k_cache, v_cache, layer, pos0, n_head, n_rep, hd, fl, sc, pc)
        elif T >= BLAS_MIN_T:
            attention_blas(att, qkv, k_cache, v_cache, layer, pos0, n_head, n_rep, hd, fl, no_cap, no_cap)
        else:
            attention(att, qkv, k_cache, v_cache, layer, pos0, n_head, n_rep, hd, fl, no_cap, no_cap)
        _cap(trace_off, trace_buf, S_ATTENTION, layer, att)
        matmul3(o, att, mats[m0 + 3], mats[m0 + 3], mats[m0 + 3], 1)
        _cap(trace_off, trace_buf, S_ATTN_OUT, layer, o)
        if cfg[POST_ATTN_NORM]:
            rmsnorm(o, o, pa_norm[layer], leps)
        add_inplace(x, o)
        _cap(trace_off, trace_buf, S_POST_ATTN_RESIDUAL, layer, x)
        # feed-forward (SwiGLU)
        rmsnorm(h, x, ffn_norm[layer], leps)
        _cap(trace_off, trace_buf, S_FFN_NORM, layer, h)
        if fl[F_FFN_SWAP]:
            matmul3(gu, h, mats[m0 + 5], mats[m0 + 4], mats[m0 + 4], 2)
        else:
            matmul3(gu, h, mats[m0 + 4], mats[m0 + 5], mats[m0 + 5], 2)
        _cap(trace_off, trace_buf, S_FFN_GATE, layer, gu[:, :n_ff])
        _cap(trace_off, trace_buf, S_FFN_UP, layer, gu[:, n_ff:])
        if trace_off[S_FFN_SILU, layer] >= 0:
            for t in range(T):  # the activation of the gate alone (silu, or gelu_tanh for GeGLU)
                for i in range(n_ff):
                    g = gu[t, i]
                    if cfg[ACT] == 1:
                        act[t, i] = np.float32(0.5) * g * (np.float32(1.0) + np.tanh(
                            np.float32(0.7978845608028654) * (g + np.float32(0.044715) * g * g * g)))
                    else:
                        act[t, i] = g / (np.float32(1.0) + np.exp(-g))
            _cap(trace_off, trace_buf, S_FFN_SILU, layer, act)
        if cfg[ACT] == 1:
            geglu(act, gu, n_ff)
        else:
            swiglu(act, gu, n_ff)
        _cap(trace_off, trace_buf, S_FFN_SWIGL, layer, act)
        matmul3(o, act, mats[m0 + 6], mats[m0 + 6], mats[m0 + 6], 1)
        _cap(trace_off, trace_buf, S_FFN_OUT, layer, o)
        if cfg[POST_FFN_NORM]:
            rmsnorm(o, o, pf_norm[layer], leps)
        add_inplace(x, o)
        _cap(trace_off, trace_buf, S_POST_FFN_RESIDUAL, layer, x)
        if layer_out.shape[0] > 0:
            layer_out[layer] = x

    n_out = logits.shape[0]
    if trace_off[S_FINAL_NORM, 0] >= 0:
        hall = np.empty((T, D), np.float32)
        rmsnorm(hall, x, output_norm, eps)
        _cap(trace_off, trace_buf, S_FINAL_NORM, 0, hall)
    if n_out > 0:
        hf = np.empty((n_out, D), np.float32)
        rmsnorm(hf, x[T - n_out:], output_norm, eps)
        head = mats[7 * L]
        matmul3(logits, hf, head, head, head, 1)
        if fp[FINAL_SOFTCAP] > 0.0:
            softcap_inplace(logits, np.float32(fp[FINAL_SOFTCAP]))
        _cap(trace_off, trace_buf, S_LM_HEAD, 0, logits)
