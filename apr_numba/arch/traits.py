"""Per-architecture facts: RoPE style, required and optional block features, activation.

This is the table :class:`apr_numba.arch.spec.ArchSpec` resolves a model file against (and the one list of
architecture names the loaders, ``.apr`` import and the CLI use). Facts from llama.cpp
``src/llama-model.cpp`` (``llama_model_rope_type``, ``load_tensors``) and the HF modeling files.
"""

from __future__ import annotations

from dataclasses import dataclass

# RoPE styles, named as in llama.cpp (ggml_rope mode) and aprender (rope_type 0 / 2).
ROPE_NORM = 0  # adjacent pairs (x[2i], x[2i+1]) rotate together: llama.cpp LLAMA_ROPE_TYPE_NORM
ROPE_NEOX = 2  # halves (x[i], x[i + head_dim/2]) rotate together: LLAMA_ROPE_TYPE_NEOX, HF rotate_half

ACT_SILU = 0  # SwiGLU: silu(gate) * up (llama, qwen)
ACT_GELU_TANH = 1  # GeGLU: gelu_tanh(gate) * up (gemma: HF ``gelu_pytorch_tanh``)
ACTIVATIONS = {"silu": ACT_SILU, "gelu_tanh": ACT_GELU_TANH}

# Features a block can have; each backend states which it implements (``ArchSpec.require``).
FEATURES = ("qkv_bias", "qk_norm", "post_attn_norm", "post_ffn_norm", "gelu_tanh", "embed_scale",
            "final_softcap", "attn_softcap", "sliding_window", "rope_freqs", "moe", "attn_scale")


@dataclass(frozen=True)
class ArchTraits:
    """What an architecture's blocks look like (facts of llama.cpp's graph builder for that architecture).

    ``optional`` lists features turned on by the presence of their tensors in the file (llama.cpp's
    ``TENSOR_NOT_REQUIRED``: llama's optional attention biases, and post-norms, which a toy variant uses to
    show that one flag reaches every backend); ``required`` ones must be there.
    """

    name: str
    rope_type: int
    required: frozenset = frozenset()
    optional: frozenset = frozenset({"qkv_bias", "post_attn_norm", "post_ffn_norm", "rope_freqs"})
    activation: str = "silu"


ARCH_TRAITS: dict[str, ArchTraits] = {t.name: t for t in (
    ArchTraits("llama", ROPE_NORM),
    ArchTraits("qwen2", ROPE_NEOX, required=frozenset({"qkv_bias"})),
    ArchTraits("qwen3", ROPE_NEOX, required=frozenset({"qk_norm"})),
    ArchTraits("qwen3moe", ROPE_NEOX, required=frozenset({"qk_norm", "moe"})),
    ArchTraits("gemma3", ROPE_NEOX, required=frozenset({"qk_norm", "post_attn_norm", "post_ffn_norm", "embed_scale",
                                                        "gelu_tanh"}),
               optional=frozenset({"sliding_window", "final_softcap", "attn_softcap"}), activation="gelu_tanh"),
)}


def rope_type_of(arch: str) -> int | None:
    """The RoPE style of architecture ``arch`` (None when unknown)."""
    t = ARCH_TRAITS.get(arch)
    return None if t is None else t.rope_type
