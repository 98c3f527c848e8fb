"""Teaching faults: known, realistic bug classes, as data attached to the trace stages where they first show.

Each :class:`FaultInfo` says what is wrong, where bugs of that class have shipped, and the stage of
:mod:`apr_numba.arch.stages` where the damage first becomes visible (``enters``), which is what bisection must
name. Every backend (Numba CPU flags, the float64 reference, OpenCL), bisection, the gates and the dashboard
read this one table; how each backend injects a fault is :mod:`apr_numba.debug.faults`.

:data:`FLAG_FAULTS` are the faults the compiled forwards take as per-layer flags (columns of the
``layer_fault`` table, ids ``F_*``); ``q4k-scale`` is a weight fault (the bytes of a matrix are rewritten).
"""

from __future__ import annotations

from dataclasses import dataclass

from apr_numba.arch.stages import STAGES

WRONG_ROPE_BASE = 10000.0  # the classic hard-coded default (llama-1 / GPT-NeoX)
WRONG_ROPE_BASE_IF_10K = 1000000.0  # used when the model's own base is 10000
WRONG_EPS = 1.0  # see FAULTS["rmsnorm-eps"]


@dataclass(frozen=True)
class FaultInfo:
    """What a teaching fault breaks (``what``), where such bugs have happened (``history``) and the trace
    stage where it first shows (``enters``; for q4k-scale it depends on the corrupted matrix)."""

    name: str
    what: str
    history: str
    enters: str


FAULTS: dict[str, FaultInfo] = {f.name: f for f in (
    FaultInfo(
        "rope-theta",
        "RoPE uses the wrong frequency base: 10000 instead of the model's rope_theta (1e5 for SmolLM2, "
        "1e6 for Qwen2.5); 1e6 when the model's base is 10000.",
        "Engines that hard-code base 10000 (llama-1's value) or ignore `rope_theta` / "
        "`{arch}.rope.freq_base` from the config; long-context models (Qwen2, CodeLlama, Llama-3) then "
        "degrade with distance. Recurring in early ports of Llama-3 and Qwen to custom runtimes.",
        "q_post_rope"),
    FaultInfo(
        "rope-style",
        "NORM (adjacent pairs 2i, 2i+1) and NEOX (halves i, i+hd/2) RoPE pairing swapped.",
        "The GGUF llama converter permutes Q/K rows so NORM RoPE on GGUF equals HF rotate_half; "
        "loading HF weights without the permute, or running Qwen2/NeoX-family models with NORM "
        "(llama.cpp's per-architecture `llama_model_rope_type` table exists because of this), gives "
        "fluent-looking garbage.",
        "q_post_rope"),
    FaultInfo(
        "attn-scale",
        "Attention scores not multiplied by 1/sqrt(head_dim).",
        "A forgotten or doubly-applied softmax scale (e.g. scale folded into Q at load and applied "
        "again in the kernel, or a fused flash-attention kernel whose `scale` argument defaults to 1).",
        "attn_scores"),
    FaultInfo(
        "causal-mask-off",
        "Queries see future positions (no causal mask) during prefill.",
        "Mask not applied on the batched prefill path (decode of one token needs no mask, so "
        "generation from a 1-token prompt still looks right); wrong mask broadcast in fused "
        "attention kernels. Scores are captured before the mask and shown lower-triangular, so the "
        "damage first shows in the softmax.",
        "attn_softmax"),
    FaultInfo(
        "gqa-map",
        "Grouped-query attention maps query head h to KV head (h // n_rep + 1) % n_kv (off by one).",
        "GQA head mapping with `h % n_kv` instead of `h // n_rep` (interleaved vs. blocked "
        "repeat_kv), or an off-by-one head offset in a KV-cache layout; common in first GQA ports "
        "of MHA-only kernels.",
        "attn_scores"),
    FaultInfo(
        "qkv-bias-drop",
        "The Q/K/V projection biases are not added (Qwen2 has them; Llama does not, so there it is a "
        "no-op and bisection must name nothing).",
        "Runtimes written for Llama (no attention biases) running Qwen2 weights and silently "
        "ignoring `attn_q.bias`/`q_proj.bias`.",
        "qkv_bias"),
    FaultInfo(
        "softmax-no-max",
        "Softmax without subtracting the row maximum, with exp() overflowing as in float16 "
        "(e^s > 65504 becomes inf, then inf/inf = NaN).",
        "Half-precision attention kernels that skip the max subtraction (it is 'only for stability'); "
        "works until a score exceeds ln(65504) = 11.09, then NaN. Attention sinks on the first token "
        "make large scores common.",
        "attn_softmax"),
    FaultInfo(
        "ffn-swap",
        "SwiGLU gate and up projections swapped: silu(h Wu^T) * (h Wg^T).",
        "Name-mapping mistakes between w1/w3 (Meta) and gate_proj/up_proj (HF), or a fused "
        "gate_up tensor split in the wrong order (Phi-3 / fused-MLP checkpoints).",
        "ffn_gate"),
    FaultInfo(
        "rmsnorm-eps",
        f"RMSNorm epsilon {WRONG_EPS:g} instead of the model's (1e-5 / 1e-6) in both norms of the layer.",
        "An epsilon taken from the wrong place (a default argument, a mis-read config key, a positional "
        "argument swapped with another scalar). Only an eps comparable to mean(x^2) matters: 1e-5 vs 1e-6 is "
        "invisible, while 1.0 rescales every row by sqrt(ms / (ms + 1)), unevenly (the attention-sink row "
        "with ms ~ 1e5 not at all, ordinary rows with ms ~ 0.01..50 by 10 %..1 %).",
        "attn_norm"),
    FaultInfo(
        "q4k-scale",
        "A Q4_K sub-block scale decoded wrongly: get_scale_min_k4 for sub-blocks 4..7 drops the two high "
        "bits of the 6-bit scale and min (`q[j+4] & 0xF` without `| (q[j-4] >> 6) << 4`).",
        "K-quant scale unpacking is the classic place for GPU/CPU kernel bugs: the 12-byte packed "
        "6-bit scales of Q4_K/Q5_K are easy to mis-unpack, and only some sub-blocks (those with high "
        "bits set) are wrong, so the output is 'almost right'. "
        "Models without Q4_K get the same error emulated on their 4-bit block scales (see "
        "corrupted_raw).",
        "ffn_out"),
)}


# matrix slot -> trace stage where a corrupted matrix first shows
MATRIX_STAGE = {"attn_q": "qkv_matmul", "attn_k": "qkv_matmul", "attn_v": "qkv_matmul",
                "attn_output": "attn_out", "ffn_gate": "ffn_gate", "ffn_up": "ffn_up", "ffn_down": "ffn_out"}

FAULT_NAMES = tuple(FAULTS)

# Teaching faults the compiled forwards implement per layer (columns of layer_fault).
FLAG_FAULTS = ("rope-theta", "rope-style", "attn-scale", "causal-mask-off", "gqa-map", "qkv-bias-drop",
               "softmax-no-max", "ffn-swap", "rmsnorm-eps")
FAULT_ID = {name: i for i, name in enumerate(FLAG_FAULTS)}
N_FAULTS = len(FLAG_FAULTS)
(F_ROPE_THETA, F_ROPE_STYLE, F_ATTN_SCALE, F_CAUSAL_MASK_OFF, F_GQA_MAP, F_QKV_BIAS_DROP, F_SOFTMAX_NO_MAX,
 F_FFN_SWAP, F_RMSNORM_EPS) = range(N_FAULTS)

assert set(FAULT_ID) <= set(FAULTS), "every forward fault flag needs a FaultInfo"
assert all(f.enters in STAGES for f in FAULTS.values()), "a fault must enter at a stage of arch.stages"
assert set(MATRIX_STAGE.values()) <= set(STAGES)
