"""Trace stages (aprender ``SaveTensorStage``): the one definition every backend, tool and the dashboard use.

:class:`SaveTensorStage` lists aprender's stages in canonical compute order (shared/docs/aprender-facts.md),
each with what the tensor is, its llama.cpp graph name and its HF transformers counterpart. Everything else
here is derived from it: :data:`STAGES` (names in order), :data:`STAGE_ID` (name -> row of the compiled
forward's ``trace_off`` table), the ``S_*`` ids the Numba forward uses, the whole-model and MoE subsets.
The teaching faults attached to these stages are data in :mod:`apr_numba.arch.faults`; which stages a block
of a given architecture has is :meth:`apr_numba.arch.spec.ArchSpec.block_stages`.
"""

from __future__ import annotations

from enum import Enum
from types import SimpleNamespace


class SaveTensorStage(str, Enum):
    """aprender's trace stages, in canonical compute order (:data:`STAGES`).

    Each member's docstring says what the tensor is, then ``llama.cpp:`` its graph tensor name and
    ``HF:`` the transformers value it equals. ``llama_cpp`` / ``hf`` hold those names.
    """

    def __new__(cls, value: str, doc: str, llama_cpp: str, hf: str):
        obj = str.__new__(cls, value)
        obj._value_ = value
        obj.__doc__ = f"{doc} llama.cpp: {llama_cpp}. HF: {hf}."
        obj.llama_cpp = llama_cpp
        obj.hf = hf
        return obj

    EMBEDDING = ("embedding", "Token embedding rows, (T, n_embd); stored as layer 0's.", "inp_embd",
                 "model.embed_tokens(input_ids) = hidden_states[0]")
    ATTN_NORM = ("attn_norm", "RMSNorm(x) * attn_norm weight, (T, n_embd).", "attn_norm",
                 "layers[N].input_layernorm output")
    QKV_MATMUL = ("qkv_matmul", "[h Wq^T | h Wk^T | h Wv^T] before bias, (T, q_dim + 2 kv_dim).",
                  "Qcur / Kcur / Vcur after build_lora_mm (before the bias add)",
                  "self_attn.q_proj/k_proj/v_proj outputs minus their bias")
    QKV_BIAS = ("qkv_bias", "Q|K|V after the bias add (= qkv_matmul when the model has no bias).",
                "Qcur / Kcur / Vcur after ggml_add(bq/bk/bv)", "self_attn.q_proj/k_proj/v_proj outputs")
    Q_POST_ROPE = ("q_post_rope", "Queries after RoPE, (T, n_head * head_dim).", "Qcur after ggml_rope_ext",
                   "query_states after apply_rotary_pos_emb (llama: GGUF row order, permuted per head)")
    K_POST_ROPE = ("k_post_rope", "Keys after RoPE, (T, n_head_kv * head_dim).", "Kcur after ggml_rope_ext",
                   "key_states after apply_rotary_pos_emb")
    ATTN_SCORES = ("attn_scores", "q k^T / sqrt(head_dim) before the mask, (n_head, T, T), zeros above the "
                   "diagonal.", "kq (llama.cpp applies the scale inside kq_soft_max; kq * scale)",
                   "eager_attention_forward attn_weights = q @ k^T * scaling, before + causal_mask")
    ATTN_SOFTMAX = ("attn_softmax", "Masked softmax of the scores, (n_head, T, T).", "kq_soft_max",
                    "attentions (output_attentions=True)")
    ATTENTION = ("attention", "softmax . V per head, heads concatenated, before the output projection, "
                 "(T, n_head * head_dim).", "kqv (kqv_merged_cont)", "attn_output before o_proj")
    ATTN_OUT = ("attn_out", "Attention output projection, (T, n_embd).", "kqv_out (attn_out)",
                "self_attn.o_proj output")
    POST_ATTN_RESIDUAL = ("post_attn_residual", "x + attn_out, (T, n_embd).", "ffn_inp",
                          "residual + self_attn output (input of post_attention_layernorm)")
    FFN_NORM = ("ffn_norm", "RMSNorm(x) * ffn_norm weight, (T, n_embd).", "ffn_norm",
                "layers[N].post_attention_layernorm output")
    FFN_GATE = ("ffn_gate", "h Wgate^T, (T, n_ff).", "ffn_gate", "mlp.gate_proj output")
    FFN_UP = ("ffn_up", "h Wup^T, (T, n_ff).", "ffn_up", "mlp.up_proj output")
    FFN_SILU = ("ffn_silu", "silu(gate) = g / (1 + e^-g), (T, n_ff).", "ffn_silu (unfused path)",
                "mlp.act_fn(gate_proj(x))")
    FFN_SWIGL = ("ffn_swigl", "silu(gate) * up, (T, n_ff).", "ffn_swiglu", "input of mlp.down_proj")
    FFN_OUT = ("ffn_out", "Down projection, (T, n_embd).", "ffn_out", "mlp.down_proj output (mlp output)")
    POST_FFN_RESIDUAL = ("post_ffn_residual", "Block output x + ffn_out, (T, n_embd); alias layer_output.",
                         "l_out", "hidden_states[N + 1] (for the last block HF stores the final norm instead)")
    MOE_ROUTER = ("moe_router", "Router logits (mixture-of-experts models only).", "ffn_moe_logits",
                  "router_logits (Qwen2MoE / Mixtral gate)")
    MOE_FFN_OUT = ("moe_ffn_out", "Weighted sum of the selected experts (MoE only).", "ffn_moe_out",
                   "sparse MoE block output")
    MOE_ROUTER_INDICES = ("moe_router_indices", "Top-k expert ids (MoE only).", "ffn_moe_topk",
                          "selected_experts")
    FINAL_NORM = ("final_norm", "RMSNorm of the last block output * output_norm, (T, n_embd); whole-model.",
                  "result_norm", "hidden_states[-1] (HF's last entry is after the final norm)")
    LM_HEAD = ("lm_head", "Logits of every position, (T, n_vocab); whole-model.", "result_output",
               "logits")


# Canonical compute order. Whole-model stages: final_norm, lm_head. moe_* exist only for MoE models.
STAGES = tuple(s.value for s in SaveTensorStage)
STAGE_ID = {name: i for i, name in enumerate(STAGES)}
N_STAGES = len(STAGES)
WHOLE_MODEL_STAGES = frozenset({"final_norm", "lm_head"})
MOE_STAGES = frozenset({"moe_router", "moe_ffn_out", "moe_router_indices"})
DENSE_STAGES = tuple(s for s in STAGES if s not in MOE_STAGES)
# Stage names as attributes (``STAGE.attn_norm == "attn_norm"``, a plain str): backends spell a stage through
# this, so a misspelt name fails at import instead of silently tracing nothing.
STAGE = SimpleNamespace(**{s: s for s in STAGES})
ALIASES = {"layer_output": "post_ffn_residual"}

(S_EMBEDDING, S_ATTN_NORM, S_QKV_MATMUL, S_QKV_BIAS, S_Q_POST_ROPE, S_K_POST_ROPE, S_ATTN_SCORES,
 S_ATTN_SOFTMAX, S_ATTENTION, S_ATTN_OUT, S_POST_ATTN_RESIDUAL, S_FFN_NORM, S_FFN_GATE, S_FFN_UP,
 S_FFN_SILU, S_FFN_SWIGL, S_FFN_OUT, S_POST_FFN_RESIDUAL, S_MOE_ROUTER, S_MOE_FFN_OUT,
 S_MOE_ROUTER_INDICES, S_FINAL_NORM, S_LM_HEAD) = range(N_STAGES)


# Where each stage is computed inside a block, the order bisection walks: aprender's enum lists the MoE stages
# last, but they replace the dense FFN's ffn_gate..ffn_swigl (router logits, top-k ids, weighted experts, then
# ffn_out = moe_ffn_out before any post-FFN norm).
_FFN_NORM_AT = STAGES.index("ffn_norm") + 1
COMPUTE_ORDER = (STAGES[:_FFN_NORM_AT] + ("moe_router", "moe_router_indices", "moe_ffn_out")
                 + tuple(s for s in STAGES[_FFN_NORM_AT:] if s not in MOE_STAGES))
COMPUTE_RANK = {name: i for i, name in enumerate(COMPUTE_ORDER)}
assert set(COMPUTE_ORDER) == set(STAGES) and len(COMPUTE_ORDER) == N_STAGES


def stage_doc(name: str) -> str:
    """The docstring of a stage (aliases accepted)."""
    return SaveTensorStage(ALIASES.get(name, name)).__doc__
