"""Trace stages (aprender ``SaveTensorStage``) and teaching-fault ids shared by every backend.

Stage ids index the rows of the forward's ``trace_off`` table; the order is the canonical compute order
of shared/docs/aprender-facts.md. Fault ids index the columns of the per-layer ``layer_fault`` table.
"""

from __future__ import annotations

# Canonical compute order. Whole-model stages: final_norm, lm_head. moe_* exist only for MoE models.
STAGES = (
    "embedding", "attn_norm", "qkv_matmul", "qkv_bias", "q_post_rope", "k_post_rope", "attn_scores",
    "attn_softmax", "attention", "attn_out", "post_attn_residual", "ffn_norm", "ffn_gate", "ffn_up",
    "ffn_silu", "ffn_swigl", "ffn_out", "post_ffn_residual", "moe_router", "moe_ffn_out",
    "moe_router_indices", "final_norm", "lm_head",
)
STAGE_ID = {name: i for i, name in enumerate(STAGES)}
N_STAGES = len(STAGES)
WHOLE_MODEL_STAGES = frozenset({"final_norm", "lm_head"})
MOE_STAGES = frozenset({"moe_router", "moe_ffn_out", "moe_router_indices"})
ALIASES = {"layer_output": "post_ffn_residual"}

(S_EMBEDDING, S_ATTN_NORM, S_QKV_MATMUL, S_QKV_BIAS, S_Q_POST_ROPE, S_K_POST_ROPE, S_ATTN_SCORES,
 S_ATTN_SOFTMAX, S_ATTENTION, S_ATTN_OUT, S_POST_ATTN_RESIDUAL, S_FFN_NORM, S_FFN_GATE, S_FFN_UP,
 S_FFN_SILU, S_FFN_SWIGL, S_FFN_OUT, S_POST_FFN_RESIDUAL, S_MOE_ROUTER, S_MOE_FFN_OUT,
 S_MOE_ROUTER_INDICES, S_FINAL_NORM, S_LM_HEAD) = range(N_STAGES)

# Teaching faults the compiled forward implements per layer (columns of layer_fault).
FAULTS = ("rope-theta", "rope-style", "attn-scale", "causal-mask-off", "gqa-map", "qkv-bias-drop",
          "softmax-no-max", "ffn-swap", "rmsnorm-eps")
FAULT_ID = {name: i for i, name in enumerate(FAULTS)}
N_FAULTS = len(FAULTS)
(F_ROPE_THETA, F_ROPE_STYLE, F_ATTN_SCALE, F_CAUSAL_MASK_OFF, F_GQA_MAP, F_QKV_BIAS_DROP, F_SOFTMAX_NO_MAX,
 F_FFN_SWAP, F_RMSNORM_EPS) = range(N_FAULTS)
