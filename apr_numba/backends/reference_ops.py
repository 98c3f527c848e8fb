"""The float64 reference's operations: plain NumPy, written for reading (HF modeling files, llama2.c).

Every function takes and returns float64 arrays. Sources: RMSNorm (Zhang & Sennrich 2019; HF
``LlamaRMSNorm``), RoPE (Su et al. 2021; HF ``apply_rotary_pos_emb``, llama.cpp ``ggml_rope_ext`` with
``freq_factors``), causal GQA attention with an optional sliding window and score soft-capping (HF
``eager_attention_forward``, ``Gemma3Attention``; llama.cpp ``llm_graph_input_attn_kv::set_input`` mask),
SwiGLU / GeGLU (Shazeer 2020), and the mixture-of-experts FFN (HF ``Qwen3MoeSparseMoeBlock``; llama.cpp
``build_moe_ffn`` with softmax gating and ``norm_w``).
"""

from __future__ import annotations

import math

import numpy as np

from apr_numba.arch.stages import STAGE
from apr_numba.arch.traits import ROPE_NEOX, ROPE_NORM
from apr_numba.debug.faults import NO_FAULTS, BlockFaults
from apr_numba.errors import ModelFormatError

F16_MAX = 65504.0  # largest finite float16 (softmax-no-max fault)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis: ``x / sqrt(mean(x^2) + eps) * weight`` (HF LlamaRMSNorm)."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def silu(x: np.ndarray) -> np.ndarray:
    """SiLU / swish: ``x * sigmoid(x)``."""
    return x / (1.0 + np.exp(-x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (HF ``gelu_pytorch_tanh``): ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax; ``-inf`` entries get probability 0."""
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def rope(x: np.ndarray, positions: np.ndarray, theta_base: float, rope_type: int,
         freq_factors: np.ndarray | None = None, pos_scale: float = 1.0) -> np.ndarray:
    """Rotary position embedding.

    Args:
        x: (T, n_heads, head_dim) queries or keys.
        positions: (T,) integer positions p.
        theta_base: RoPE frequency base (``{arch}.rope.freq_base``).
        rope_type: ROPE_NORM rotates (x[2i], x[2i+1]); ROPE_NEOX rotates (x[i], x[i + head_dim/2]).
        freq_factors: (head_dim/2,) divisors of each frequency (GGUF ``rope_freqs``, Llama-3 scaling).
        pos_scale: linear RoPE scaling (positions times 1 / factor).

    Returns:
        (T, n_heads, head_dim) float64 with each pair (a, b) rotated by angle p * theta_i,
        theta_i = base^(-2i/head_dim) / f_i: (a cos - b sin, a sin + b cos).
    """
    hd = x.shape[-1]
    inv_freq = theta_base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)  # (hd/2,)
    if freq_factors is not None:
        inv_freq = inv_freq / np.asarray(freq_factors, np.float64)
    pos = positions.astype(np.float64)
    if pos_scale != 1.0:
        pos = pos * pos_scale
    angle = pos[:, None] * inv_freq[None, :]  # (T, hd/2)
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]  # broadcast over heads
    if rope_type == ROPE_NORM:
        a, b = x[..., 0::2], x[..., 1::2]
    elif rope_type == ROPE_NEOX:
        a, b = x[..., : hd // 2], x[..., hd // 2:]
    else:
        raise ModelFormatError(f"unknown rope_type {rope_type}")
    out = np.empty_like(x, dtype=np.float64)
    ra, rb = a * cos - b * sin, a * sin + b * cos
    if rope_type == ROPE_NORM:
        out[..., 0::2], out[..., 1::2] = ra, rb
    else:
        out[..., : hd // 2], out[..., hd // 2:] = ra, rb
    return out


def attention_mask(q_pos: np.ndarray, k_pos: np.ndarray, window: int = 0, causal: bool = True) -> np.ndarray:
    """Additive mask (Tq, Tk): 0 where query position q may see key position k, -inf elsewhere.

    Causal: k <= q. Sliding window ``window`` > 0: also q - k < window (llama.cpp LLAMA_SWA_TYPE_STANDARD,
    HF ``sliding_window``).
    """
    q, k = q_pos[:, None], k_pos[None, :]
    ok = np.ones((q_pos.size, k_pos.size), bool)
    if causal:
        ok &= k <= q
        if window > 0:
            ok &= (q - k) < window
    return np.where(ok, 0.0, -np.inf)


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, faults: BlockFaults = NO_FAULTS,
                     trace: dict | None = None, q_pos: np.ndarray | None = None, k_pos: np.ndarray | None = None,
                     window: int = 0, scale: float | None = None, softcap: float = 0.0) -> np.ndarray:
    """Causal multi-head attention with grouped-query KV heads.

    Args:
        q: (T, n_head, hd); k, v: (Tk, n_head_kv, hd) (Tk = cached + new positions), n_head a multiple of
            n_head_kv.
        faults: teaching faults of this block (apr_numba.debug.faults): ``attn-scale`` drops the scale,
            ``causal-mask-off`` removes the mask, ``gqa-map`` reads kv head (h // n_rep + 1) % n_kv,
            ``softmax-no-max`` skips the max subtraction, holds e^s in float32 (a row whose every e^s
            underflows gives 0/0 = NaN) and overflows like float16 (e^s > 65504 -> inf, inf/inf = NaN).
        trace: if a dict, ``attn_scores`` (scaled, before the mask, shown with zeros where masked)
            and ``attn_softmax`` are stored in it, each (n_head, T, Tk).
        q_pos, k_pos: positions of the queries (default 0..T-1) and keys (default 0..Tk-1).
        window: sliding window (0 = full causal attention). scale: score scale (default 1/sqrt(hd)).
        softcap: scores become ``softcap * tanh(s / softcap)`` before the mask (0 = off).

    Returns:
        (T, n_head * hd): per head ``softmax(q k^T * scale + mask) v``, where query head h reads
        kv head ``h // (n_head / n_head_kv)`` (HF ``repeat_kv``).
    """
    t, n_head, hd = q.shape
    tk, n_kv = k.shape[0], k.shape[1]
    n_rep = n_head // n_kv
    q_pos = np.arange(t) if q_pos is None else q_pos
    k_pos = np.arange(tk) if k_pos is None else k_pos
    mask = attention_mask(q_pos, k_pos, window, causal="causal-mask-off" not in faults)
    visible = ~np.isneginf(mask)
    if scale is None:
        scale = 1.0 / math.sqrt(hd)
    if "attn-scale" in faults:
        scale = 1.0
    out = np.empty((t, n_head, hd))
    all_scores, all_probs = np.zeros((n_head, t, tk)), np.empty((n_head, t, tk))
    for h in range(n_head):
        kv = h // n_rep
        if "gqa-map" in faults:
            kv = (kv + 1) % n_kv
        scores = q[:, h, :] @ k[:, kv, :].T * scale  # (T, Tk), before the mask
        if softcap > 0:
            scores = softcap * np.tanh(scores / softcap)
        if "softmax-no-max" in faults:  # the faulty kernels: no max subtraction, exp held in float32
            with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
                e = np.exp(scores + mask).astype(np.float32).astype(np.float64)  # (underflow -> 0: 0/0 = NaN)
                e[e > F16_MAX] = np.inf  # and overflowing like float16
                probs = np.where(visible, e / np.sum(e, axis=-1, keepdims=True), 0.0)  # masked: 0
        else:
            probs = softmax(scores + mask, axis=-1)
        all_scores[h] = np.where(k_pos[None, :] <= q_pos[:, None], scores, 0.0)
        all_probs[h] = probs
        out[:, h, :] = probs @ v[:, kv, :]
    if trace is not None:
        trace.update({STAGE.attn_scores: all_scores, STAGE.attn_softmax: all_probs})
    return out.reshape(t, n_head * hd)


def moe_ffn(h: np.ndarray, router: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray, k: int,
            norm: bool, act=silu, trace: dict | None = None) -> np.ndarray:
    """Mixture-of-experts FFN with softmax gating over the top-k experts.

    Args:
        h: (T, D) normed input. router: (E, D). gate, up: (E, F, D); down: (E, D, F) (only the chosen
            experts' rows are used). k: experts per token. norm: renormalise the top-k weights to sum 1.
        trace: if a dict, ``moe_router`` (T, E) logits, ``moe_router_indices`` (T, k) expert ids (as floats)
            and ``moe_ffn_out`` (T, D) are stored in it.

    Returns:
        (T, D): sum over the chosen experts e of w_e * down_e(act(gate_e h) * up_e h).
    """
    logits = h @ router.T  # (T, E)
    probs = softmax(logits, axis=-1)
    idx = np.argsort(-probs, axis=-1, kind="stable")[:, :k]  # (T, k), ties to the lower id (torch.topk)
    wts = np.take_along_axis(probs, idx, axis=-1)
    if norm:
        wts = wts / np.sum(wts, axis=-1, keepdims=True)
    out = np.zeros_like(h)
    for t in range(h.shape[0]):
        for j in range(k):
            e = idx[t, j]
            out[t] += wts[t, j] * (down[e] @ (act(gate[e] @ h[t]) * (up[e] @ h[t])))
    if trace is not None:
        trace.update({STAGE.moe_router: logits, STAGE.moe_router_indices: idx.astype(np.float64),
                      STAGE.moe_ffn_out: out})
    return out
