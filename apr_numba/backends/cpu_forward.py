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
    S_MOE_FFN_OUT,
    S_MOE_ROUTER,
    S_MOE_ROUTER_INDICES,
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
 POST_FFN_NORM, ACT, N_EXPERT, N_EXPERT_USED, EXPERT_NORM, N_FF_EXPERT) = range(17)
# fp tuple fields (float): RMSNorm eps, embedding scale, final logit soft-cap (0 = off)
EPS, EMBED_SCALE, FINAL_SOFTCAP = range(3)
# implemented ArchSpec features (apr_numba.arch.traits.FEATURES)
IMPLEMENTS = frozenset({"qkv_bias", "qk_norm", "post_attn_norm", "post_ffn_norm", "gelu_tanh", "embed_scale",
                        "final_softcap", "rope_freqs", "sliding_window", "moe"})


def cfg_tuple(spec) -> tuple:
    """The forward's int64 ``cfg`` tuple for an :class:`~apr_numba.arch.spec.ArchSpec`."""
    c = spec.hp
    return tuple(np.int64(v) for v in (c.n_layer, c.n_embd, c.n_head, c.n_head_kv, c.head_dim, c.n_ff, c.n_vocab,
                                       spec.rope_type, spec.qkv_bias, spec.qk_norm, spec.post_attn_norm,
                                       spec.post_ffn_norm, spec.activation, spec.n_expert, spec.n_expert_used,
                                       spec.expert_norm, spec.n_ff_expert))


def fp_tuple(spec) -> tuple:
    """The forward's float ``fp`` tuple (eps, embedding scale, final soft-cap) for an ArchSpec."""
    return (float(spec.hp.rms_eps), float(spec.embed_scale), float(spec.final_softcap))


@njit(nogil=True, cache=True)
def dims(cfg):
    """(n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff, q_dim, kv_dim, n_rep) of a ``cfg`` tuple: q_dim =
    n_head * head_dim, kv_dim = n_head_kv * head_dim, n_rep = n_head // n_head_kv (GQA)."""
    n_head, n_kv, hd = cfg[N_HEAD], cfg[N_HEAD_KV], cfg[HEAD_DIM]
    return cfg[N_LAYER], cfg[N_EMBD], n_head, n_kv, hd, cfg[N_FF], n_head * hd, n_kv * hd, n_head // n_kv


@njit(nogil=True, cache=True)
def kv_ends(pos, seq):
    """(kv_end int64 (T,), contiguous): the positions sequence seq[t] holds after a call of tokens at (pos,
    seq), and whether the call is one sequence at consecutive positions (a prefill)."""
    T = pos.shape[0]
    contiguous = True
    for t in range(T):
        if seq[t] != seq[0] or pos[t] != pos[0] + t:
            contiguous = False
    kv_end = np.full(T, pos[0] + T, np.int64)
    if not contiguous:  # a batch of a few sequences: O(T^2) is nothing
        for t in range(T):
            e = pos[t] + 1
            for u in range(T):
                if seq[u] == seq[t] and pos[u] + 1 > e:
                    e = pos[u] + 1
            kv_end[t] = e
    return kv_end, contiguous


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
def _out_residual(x, o, a, mat, post, post_w, eps, trace_off, trace_buf, s_out, s_res, layer):
    """A sub-layer's end: o = a @ mat.T (stage ``s_out``), the optional post-norm of o, then x += o (``s_res``)."""
    matmul3(o, a, mat, mat, mat, np.int64(1))
    _cap(trace_off, trace_buf, s_out, layer, o)
    if post:
        rmsnorm(o, o, post_w, eps)
    add_inplace(x, o)
    _cap(trace_off, trace_buf, s_res, layer, x)


@njit(fastmath=FASTMATH, error_model="numpy", nogil=True, cache=True)
def _moe_ffn(out, h, router, experts, layer, cfg, trace_off, trace_buf):
    """Mixture-of-experts FFN: out (T, D) <- sum over the top-k experts e of w_e * down_e(act(gate_e h) * up_e h).

    Router logits (T, E) = h @ router.T (stage moe_router); softmax over the experts, the top-k by probability
    (ties to the lower id, as torch.topk), weights renormalised to sum 1 when ``expert_norm`` (HF
    ``Qwen3MoeSparseMoeBlock``, llama.cpp ``build_moe_ffn`` with softmax gating and ``norm_w``). Only the chosen
    experts' matrices are read: each token's k experts run as single-row products (stage moe_router_indices holds
    the ids as floats, moe_ffn_out the result).
    """
    T = h.shape[0]
    E, k, Fe = cfg[N_EXPERT], cfg[N_EXPERT_USED], cfg[N_FF_EXPERT]
    logits = np.empty((T, E), np.float32)
    matmul3(logits, h, router, router, router, np.int64(1))
    _cap(trace_off, trace_buf, np.int64(S_MOE_ROUTER), layer, logits)
    idx = np.empty((T, k), np.float32)
    gu = np.empty((1, 2 * Fe), np.float32)
    a = np.empty((1, Fe), np.float32)
    y = np.empty((1, out.shape[1]), np.float32)
    out[:] = 0.0
    for t in range(T):
        mx = logits[t].max()
        p = np.exp(logits[t] - mx)
        p /= p.sum()
        chosen = np.empty(k, np.int64)
        wsum = np.float32(0.0)
        for j in range(k):
            best = -1
            for e in range(E):
                taken = False
                for jj in range(j):
                    if chosen[jj] == e:
                        taken = True
                if not taken and (best < 0 or p[e] > p[best]):
                    best = e
            chosen[j] = best
            wsum += p[best]
        for j in range(k):
            e = chosen[j]
            idx[t, j] = e
            w = p[e] / wsum if cfg[EXPERT_NORM] else p[e]
            base = 3 * (layer * E + e)
            matmul3(gu, h[t:t + 1], experts[base], experts[base + 1], experts[base + 1], np.int64(2))
            if cfg[ACT] == 1:
                geglu(a, gu, Fe)
            else:
                swiglu(a, gu, Fe)
            matmul3(y, a, experts[base + 2], experts[base + 2], experts[base + 2], np.int64(1))
            for i in range(out.shape[1]):
                out[t, i] += w * y[0, i]
    _cap(trace_off, trace_buf, np.int64(S_MOE_ROUTER_INDICES), layer, idx)
    _cap(trace_off, trace_buf, np.int64(S_MOE_FFN_OUT), layer, out)


@njit(fastmath=FASTMATH, error_model="numpy", nogil=True, cache=True)
def forward(tokens, pos, seq, cfg, fp, w, rope, k_cache, v_cache, logits, layer_out, dbg):
    """Run the decoder on ``tokens`` (T,) int64, token t at position ``pos[t]`` of sequence ``seq[t]``.

    One call is llama.cpp's ubatch: a prefill (T consecutive positions of one sequence) or a batched decode
    step (one token of each of T sequences, llama-server's parallel slots), or any mix. The matrix products
    take the T tokens as one (T, n) block, so the weights are read once per call; RoPE, the KV store and
    attention are per token, at its position, in its sequence's cache. A token sees the keys of its own
    sequence at positions <= its own, those of the same call included (causal).

    Args:
        pos, seq: int64 (T,) each token's position and sequence (index into the first axis of the caches).
            Each (seq, pos) pair at most once; a sequence's positions before its tokens' must be cached.
        cfg: int64 tuple (:func:`cfg_tuple`): n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff, n_vocab,
            rope_type, has_bias, qk_norm, post_attn_norm, post_ffn_norm, activation.
        fp: float tuple (:func:`fp_tuple`): RMSNorm eps, embedding scale, final logit soft-cap (0 = off).
        w: weights tuple (``ModelWeights.kernel_args``): (mats, embd_raw, embd_type, attn_norm, ffn_norm,
            bias_qkv, output_norm, q_norm, k_norm, post_attn_norm, post_ffn_norm, experts). ``mats`` is a typed
            List of packed matrices, 7 per layer then the LM head (see weights.LAYER_MATS; in a MoE layer slot 4
            is the router); ``experts`` (MoE) 3 per expert (gate, up, down), index 3 * (layer * n_expert + e);
            norms float32 (n_layer, n), (n_layer, 0) when the model has none.
        rope: (cos, sin, layer_table, layer_window): float32 (n_tables, n_ctx, head_dim/2) RoPE tables, int64
            (n_layer,) the table of each layer (gemma3's local layers have their own base), and int64 (n_layer,)
            each layer's sliding attention window (0 = full).
        k_cache, v_cache: float32 (n_seq, n_layer, n_ctx, kv_dim), one cache per sequence (a single sequence
            passes ``k[None]``), written at [seq[t], :, pos[t]].
        logits: float32 (n_out, n_vocab): filled with the logits of the last n_out tokens (n_out may be 0;
            n_out = T for a batched decode step).
        layer_out: float32 (n_layer, T, n_embd) to capture each block's output (post_ffn_residual), or
            a (0, 0, 0) array to skip the capture.
        dbg: tracing and teaching faults (apr_numba.arch.stages, apr_numba.arch.faults), a tuple
            (trace_off int64 (N_STAGES, n_layer), trace_buf float32 (n,), layer_fault int64 (n_layer, N_FAULTS),
            rope_cos_alt, rope_sin_alt (RoPE tables with the wrong base, for F_ROPE_THETA), eps_alt float).
            A stage is written to trace_buf[trace_off[stage, layer]:] as (T, width) row-major when its offset
            is >= 0 (attn_scores / attn_softmax as (n_head, T, max(pos)+1)); whole-model stages use layer 0.

    A prefill of T >= BLAS_MIN_T consecutive positions of one sequence runs attention through BLAS
    (:func:`~apr_numba.kernels.attention.attention_blas`); anything else through the per-token kernel.
    """
    (mats, embd_raw, embd_type, attn_norm, ffn_norm, bias_qkv, output_norm, q_norm, k_norm, pa_norm, pf_norm,
     experts) = w
    rope_cos_all, rope_sin_all, rope_layer, layer_window = rope
    eps = fp[EPS]
    trace_off, trace_buf, layer_fault, rope_cos_alt, rope_sin_alt, eps_alt = dbg
    T = tokens.shape[0]
    L, D, n_head, n_kv, hd, n_ff, q_dim, kv_dim, n_rep = dims(cfg)
    # kv_end[t]: positions of sequence seq[t] cached after this call; nk: the widest (the trace's key axis)
    kv_end, contiguous = kv_ends(pos, seq)  # contiguous: a prefill, the BLAS attention path applies
    nk = kv_end.max()
    pos0 = pos[0]
    blas_attn = contiguous and T >= BLAS_MIN_T
    kc0 = k_cache[seq[0]]  # the sequence of a contiguous call
    vc0 = v_cache[seq[0]]

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
    _cap(trace_off, trace_buf, np.int64(S_EMBEDDING), 0, x)
    for layer in range(L):
        m0 = 7 * layer
        fl = layer_fault[layer]
        win = layer_window[layer]
        leps = eps_alt if fl[F_RMSNORM_EPS] else eps
        # attention
        rmsnorm(h, x, attn_norm[layer], leps)
        _cap(trace_off, trace_buf, np.int64(S_ATTN_NORM), layer, h)
        matmul3(qkv, h, mats[m0], mats[m0 + 1], mats[m0 + 2], np.int64(3))
        _cap(trace_off, trace_buf, np.int64(S_QKV_MATMUL), layer, qkv)
        if cfg[HAS_BIAS] and not fl[F_QKV_BIAS_DROP]:
            b = bias_qkv[layer]
            for t in range(T):
                for i in range(q_dim + 2 * kv_dim):
                    qkv[t, i] += b[i]
        _cap(trace_off, trace_buf, np.int64(S_QKV_BIAS), layer, qkv)
        rtype = cfg[ROPE_TYPE] ^ 2 if fl[F_ROPE_STYLE] else cfg[ROPE_TYPE]  # NORM 0 <-> NEOX 2
        if cfg[QK_NORM]:
            rmsnorm_heads(qkv, 0, n_head, hd, q_norm[layer], leps)
            rmsnorm_heads(qkv, q_dim, n_kv, hd, k_norm[layer], leps)
        if fl[F_ROPE_THETA]:
            rc, rs = rope_cos_alt, rope_sin_alt
        else:
            rc, rs = rope_cos_all[rope_layer[layer]], rope_sin_all[rope_layer[layer]]
        rope_inplace(qkv, 0, n_head, hd, pos, rc, rs, rtype)
        rope_inplace(qkv, q_dim, n_kv, hd, pos, rc, rs, rtype)
        _cap(trace_off, trace_buf, np.int64(S_Q_POST_ROPE), layer, qkv[:, :q_dim])
        _cap(trace_off, trace_buf, np.int64(S_K_POST_ROPE), layer, qkv[:, q_dim:q_dim + kv_dim])
        store_kv(k_cache, v_cache, layer, seq, pos, qkv, q_dim, kv_dim)
        so = trace_off[S_ATTN_SCORES, layer]
        po = trace_off[S_ATTN_SOFTMAX, layer]
        if so >= 0 and po >= 0:
            n3 = n_head * T * nk
            sc = trace_buf[so:so + n3].reshape((n_head, T, nk))
            pc = trace_buf[po:po + n3].reshape((n_head, T, nk))
            sc[:] = 0.0
            pc[:] = 0.0
            if blas_attn:
                attention_blas(att, qkv, kc0, vc0, layer, pos0, n_head, n_rep, hd, win, fl, sc, pc)
            else:
                attention(att, qkv, k_cache, v_cache, layer, seq, pos, kv_end, n_head, n_rep, hd, win, fl, sc, pc)
        elif blas_attn:
            attention_blas(att, qkv, kc0, vc0, layer, pos0, n_head, n_rep, hd, win, fl, no_cap, no_cap)
        else:
            attention(att, qkv, k_cache, v_cache, layer, seq, pos, kv_end, n_head, n_rep, hd, win, fl, no_cap, no_cap)
        _cap(trace_off, trace_buf, np.int64(S_ATTENTION), layer, att)
        _out_residual(x, o, att, mats[m0 + 3], cfg[POST_ATTN_NORM], pa_norm[layer], leps, trace_off, trace_buf,
                      np.int64(S_ATTN_OUT), np.int64(S_POST_ATTN_RESIDUAL), layer)
        # feed-forward: SwiGLU / GeGLU, or the mixture of experts
        rmsnorm(h, x, ffn_norm[layer], leps)
        _cap(trace_off, trace_buf, np.int64(S_FFN_NORM), layer, h)
        if cfg[N_EXPERT] > 0:
            _moe_ffn(o, h, mats[m0 + 4], experts, layer, cfg, trace_off, trace_buf)
            _cap(trace_off, trace_buf, np.int64(S_FFN_OUT), layer, o)
            if cfg[POST_FFN_NORM]:
                rmsnorm(o, o, pf_norm[layer], leps)
            add_inplace(x, o)
            _cap(trace_off, trace_buf, np.int64(S_POST_FFN_RESIDUAL), layer, x)
            if layer_out.shape[0] > 0:
                layer_out[layer] = x
            continue
        if fl[F_FFN_SWAP]:
            matmul3(gu, h, mats[m0 + 5], mats[m0 + 4], mats[m0 + 4], np.int64(2))
        else:
            matmul3(gu, h, mats[m0 + 4], mats[m0 + 5], mats[m0 + 5], np.int64(2))
        _cap(trace_off, trace_buf, np.int64(S_FFN_GATE), layer, gu[:, :n_ff])
        _cap(trace_off, trace_buf, np.int64(S_FFN_UP), layer, gu[:, n_ff:])
        if trace_off[S_FFN_SILU, layer] >= 0:
            for t in range(T):  # the activation of the gate alone (silu, or gelu_tanh for GeGLU)
                for i in range(n_ff):
                    g = gu[t, i]
                    if cfg[ACT] == 1:
                        act[t, i] = np.float32(0.5) * g * (np.float32(1.0) + np.tanh(
                            np.float32(0.7978845608028654) * (g + np.float32(0.044715) * g * g * g)))
                    else:
                        act[t, i] = g / (np.float32(1.0) + np.exp(-g))
            _cap(trace_off, trace_buf, np.int64(S_FFN_SILU), layer, act)
        if cfg[ACT] == 1:
            geglu(act, gu, n_ff)
        else:
            swiglu(act, gu, n_ff)
        _cap(trace_off, trace_buf, np.int64(S_FFN_SWIGL), layer, act)
        _out_residual(x, o, act, mats[m0 + 6], cfg[POST_FFN_NORM], pf_norm[layer], leps, trace_off, trace_buf,
                      np.int64(S_FFN_OUT), np.int64(S_POST_FFN_RESIDUAL), layer)
        if layer_out.shape[0] > 0:
            layer_out[layer] = x

    n_out = logits.shape[0]
    if trace_off[S_FINAL_NORM, 0] >= 0:
        hall = np.empty((T, D), np.float32)
        rmsnorm(hall, x, output_norm, eps)
        _cap(trace_off, trace_buf, np.int64(S_FINAL_NORM), 0, hall)
    if n_out > 0:
        hf = np.empty((n_out, D), np.float32)
        rmsnorm(hf, x[T - n_out:], output_norm, eps)
        head = mats[7 * L]
        matmul3(logits, hf, head, head, head, np.int64(1))
        if fp[FINAL_SOFTCAP] > 0.0:
            softcap_inplace(logits, np.float32(fp[FINAL_SOFTCAP]))
        _cap(trace_off, trace_buf, np.int64(S_LM_HEAD), 0, logits)
