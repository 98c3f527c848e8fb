"""``ArchSpec``: one description of a decoder architecture, built from GGUF metadata, that every backend executes.

An architecture is written here once, as data: which tensors each block has and their shapes, the norms
around attention and FFN, QK-norm, QKV bias, the activation, RoPE (type, base, scaling, per-layer base),
the attention window per layer, the embedding scale, a tied LM head, soft-capping and the mixture-of-experts
fields. The Numba CPU forward (:mod:`apr_numba.backends.cpu_forward`), the OpenCL backend
(:mod:`apr_numba.backends.opencl`) and the float64 reference (:mod:`apr_numba.backends.reference`) all read
the same :class:`ArchSpec`; the tensors they load are the ones :meth:`ArchSpec.block_tensors` names, checked
once by :func:`apr_numba.model.plan.check_tensors`.

The per-architecture facts (:data:`apr_numba.arch.traits.ARCH_TRAITS`) follow llama.cpp's
``src/llama-arch.cpp`` (tensor names),
``src/llama-model.cpp`` (``load_hparams`` / ``load_tensors``, ``llama_model_rope_type``) and the HF modeling
files (``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ``Qwen3DecoderLayer``, ``Qwen3MoeSparseMoeBlock``,
``Gemma3DecoderLayer``). A feature a backend has not implemented yet is refused at load with a message that
names it (:meth:`ArchSpec.require`), never computed wrongly.

Adding an architecture: add its :class:`ArchTraits` row; a new kind of block feature: add a field here, the
tensors it needs in :meth:`ArchSpec.block_tensors`, and its step in each backend (docs/architecture.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from apr_numba.arch.stages import DENSE_STAGES, MOE_STAGES, STAGES, WHOLE_MODEL_STAGES
from apr_numba.arch.traits import ACT_GELU_TANH, ACT_SILU, ACTIVATIONS, ARCH_TRAITS, FEATURES  # noqa: F401
from apr_numba.errors import ModelFormatError
from apr_numba.model.hparams import ModelConfig

# llama.cpp tensor-name suffixes of a block (``LLM_TENSOR_*`` in llama-arch.cpp) by feature.
POST_ATTN_NORM = "post_attention_norm.weight"
POST_FFN_NORM = "post_ffw_norm.weight"
Q_NORM, K_NORM = "attn_q_norm.weight", "attn_k_norm.weight"


@dataclass(frozen=True)
class TensorSpec:
    """A tensor the description needs: GGUF name, NumPy shape (out, in) and whether it is a matrix
    (packed for the kernels) or a vector (float32 norm weight / bias)."""

    name: str
    shape: tuple[int, ...]
    matrix: bool


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (``{arch}.rope.scaling.*``; llama.cpp ``llama_rope_scaling_type``).

    kind: "none", "linear" (positions / factor) or "llama3" (frequencies rescaled by wavelength, the
    ``rope_freqs`` tensor in GGUF files: llama.cpp applies it as per-frequency divisors ``freq_factors``).
    """

    kind: str = "none"
    factor: float = 1.0
    orig_ctx: int = 0


@dataclass(frozen=True)
class ArchSpec:
    """One decoder architecture, resolved for one model file.

    Attributes:
        hp: the hyper-parameters (:class:`~apr_numba.model.hparams.ModelConfig`; n_layer, n_embd, heads,
            head_dim, n_ff, n_vocab, rope base, RMSNorm eps).
        arch: GGUF ``general.architecture``.
        rope_type: ROPE_NORM (adjacent pairs) or ROPE_NEOX (halves).
        qkv_bias: Q/K/V projections have biases (qwen2).
        qk_norm: RMSNorm over each head of Q and K before RoPE (qwen3, gemma3), weights (head_dim,).
        post_attn_norm, post_ffn_norm: RMSNorm of the attention / FFN output before its residual add
            (gemma3 ``post_attention_layernorm`` / ``post_feedforward_layernorm``).
        activation: ACT_SILU (SwiGLU) or ACT_GELU_TANH (GeGLU).
        embed_scale: the embedding rows are multiplied by this (gemma: sqrt(n_embd); else 1).
        attn_scale: the attention score scale (1/sqrt(head_dim), or query_pre_attn_scalar^-1/2).
        final_softcap, attn_softcap: tanh soft-capping ``c * tanh(x / c)`` of logits / scores (0 = off).
        layer_window: per layer, the sliding attention window in positions (0 = full causal attention).
        layer_rope_base: per layer, the RoPE frequency base (gemma3's local layers have their own).
        rope_scaling: :class:`RopeScaling`. rope_freqs: the file has a ``rope_freqs.weight`` tensor.
        tied_head: the LM head is ``token_embd`` (no ``output.weight``).
        n_expert, n_expert_used: mixture-of-experts sizes (0 = dense FFN); expert_norm: the top-k weights
            are renormalised to sum to 1 (qwen3moe ``norm_topk_prob``); n_ff_expert: an expert's FFN width.
    """

    hp: ModelConfig
    arch: str
    rope_type: int
    qkv_bias: bool = False
    qk_norm: bool = False
    post_attn_norm: bool = False
    post_ffn_norm: bool = False
    activation: int = ACT_SILU
    embed_scale: float = 1.0
    attn_scale: float = 0.0
    final_softcap: float = 0.0
    attn_softcap: float = 0.0
    layer_window: tuple[int, ...] = ()
    layer_rope_base: tuple[float, ...] = ()
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    rope_freqs: bool = False
    tied_head: bool = True
    n_expert: int = 0
    n_expert_used: int = 0
    expert_norm: bool = False
    n_ff_expert: int = 0

    def __post_init__(self) -> None:
        L = self.hp.n_layer
        if not self.layer_window:
            object.__setattr__(self, "layer_window", (0,) * L)
        if not self.layer_rope_base:
            object.__setattr__(self, "layer_rope_base", (float(self.hp.rope_theta),) * L)
        if not self.attn_scale:
            object.__setattr__(self, "attn_scale", 1.0 / math.sqrt(self.hp.head_dim))
        if len(self.layer_window) != L or len(self.layer_rope_base) != L:
            raise ModelFormatError(f"{self.hp.name or self.arch}: per-layer attention tables must have {L} entries")

    # ---- what is present

    @property
    def features(self) -> frozenset:
        """The :data:`FEATURES` this model uses."""
        on = {"qkv_bias": self.qkv_bias, "qk_norm": self.qk_norm, "post_attn_norm": self.post_attn_norm,
              "post_ffn_norm": self.post_ffn_norm, "gelu_tanh": self.activation == ACT_GELU_TANH,
              "embed_scale": self.embed_scale != 1.0, "final_softcap": self.final_softcap > 0,
              "attn_softcap": self.attn_softcap > 0, "sliding_window": any(self.layer_window),
              "rope_freqs": self.rope_freqs, "moe": self.n_expert > 0,
              "attn_scale": abs(self.attn_scale * math.sqrt(self.hp.head_dim) - 1.0) > 1e-12}
        return frozenset(k for k, v in on.items() if v)

    def require(self, backend: str, implemented: frozenset, source: str = "") -> None:
        """Refuse a model that needs a feature ``backend`` does not implement.

        Raises:
            ModelFormatError: naming the file, the architecture, the missing features and what the
                backend does implement.
        """
        missing = sorted(self.features - implemented)
        if missing:
            raise ModelFormatError(
                f"{source or self.hp.name or self.arch}: architecture {self.arch!r} needs "
                f"{', '.join(missing)}, which the {backend} backend does not implement yet "
                f"(it implements: {', '.join(sorted(implemented)) or 'the plain llama block'})")

    def block_tensors(self, layer: int) -> dict[str, TensorSpec]:
        """Tensor suffix (after ``blk.{layer}.``) -> :class:`TensorSpec` for block ``layer``, in load order."""
        c = self.hp
        D, F, hd = c.n_embd, c.n_ff, c.head_dim
        p = f"blk.{layer}."
        out = {"attn_norm.weight": TensorSpec(p + "attn_norm.weight", (D,), False)}
        for s, rows in (("attn_q", c.q_dim), ("attn_k", c.kv_dim), ("attn_v", c.kv_dim)):
            out[s + ".weight"] = TensorSpec(p + s + ".weight", (rows, D), True)
        if self.qkv_bias:
            for s, rows in (("attn_q", c.q_dim), ("attn_k", c.kv_dim), ("attn_v", c.kv_dim)):
                out[s + ".bias"] = TensorSpec(p + s + ".bias", (rows,), False)
        if self.qk_norm:
            out[Q_NORM] = TensorSpec(p + Q_NORM, (hd,), False)
            out[K_NORM] = TensorSpec(p + K_NORM, (hd,), False)
        out["attn_output.weight"] = TensorSpec(p + "attn_output.weight", (D, c.q_dim), True)
        if self.post_attn_norm:
            out[POST_ATTN_NORM] = TensorSpec(p + POST_ATTN_NORM, (D,), False)
        out["ffn_norm.weight"] = TensorSpec(p + "ffn_norm.weight", (D,), False)
        if self.n_expert:
            E, Fe = self.n_expert, self.n_ff_expert
            out["ffn_gate_inp.weight"] = TensorSpec(p + "ffn_gate_inp.weight", (E, D), True)
            for s, shape in (("ffn_gate_exps", (E, Fe, D)), ("ffn_up_exps", (E, Fe, D)),
                             ("ffn_down_exps", (E, D, Fe))):
                out[s + ".weight"] = TensorSpec(p + s + ".weight", shape, True)
        else:
            out["ffn_gate.weight"] = TensorSpec(p + "ffn_gate.weight", (F, D), True)
            out["ffn_up.weight"] = TensorSpec(p + "ffn_up.weight", (F, D), True)
            out["ffn_down.weight"] = TensorSpec(p + "ffn_down.weight", (D, F), True)
        if self.post_ffn_norm:
            out[POST_FFN_NORM] = TensorSpec(p + POST_FFN_NORM, (D,), False)
        return out

    def model_tensors(self) -> dict[str, TensorSpec]:
        """Whole-model tensors: token_embd, output_norm, the LM head (absent when tied), rope_freqs."""
        c = self.hp
        out = {"token_embd.weight": TensorSpec("token_embd.weight", (c.n_vocab, c.n_embd), True),
               "output_norm.weight": TensorSpec("output_norm.weight", (c.n_embd,), False)}
        if not self.tied_head:
            out["output.weight"] = TensorSpec("output.weight", (c.n_vocab, c.n_embd), True)
        if self.rope_freqs:
            out["rope_freqs.weight"] = TensorSpec("rope_freqs.weight", (c.head_dim // 2,), False)
        return out

    def block_stages(self, layer: int | None = None) -> tuple[str, ...]:
        """The trace stages (:mod:`apr_numba.arch.stages`) a block of this model has, in compute order;
        ``layer=None``: every stage of the model (per-layer ones, then the whole-model ones)."""
        per_layer = tuple(s for s in (STAGES if self.n_expert else DENSE_STAGES) if s not in WHOLE_MODEL_STAGES)
        if self.n_expert:
            per_layer = tuple(s for s in per_layer if s not in ("ffn_gate", "ffn_up", "ffn_silu", "ffn_swigl")
                              or s in MOE_STAGES)
        if layer is not None:
            return per_layer
        return per_layer + tuple(s for s in STAGES if s in WHOLE_MODEL_STAGES)

    def with_features(self, **changes: Any) -> ArchSpec:
        """A copy with some fields changed (tests and toy variants)."""
        return replace(self, **changes)

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], source: str, tensors: Mapping[str, Any],
                      n_vocab: int | None = None) -> ArchSpec:
        """Resolve the description of the model in ``source`` from its GGUF metadata and tensor table.

        Args:
            meta: GGUF key -> value. source: the file (for messages). tensors: name -> object with ``shape``
                (NumPy order); optional features are detected by the presence of their tensors.
            n_vocab: rows of token_embd, when the metadata states no vocabulary size.

        Raises:
            ModelFormatError: unknown architecture (the message lists the known ones), a required feature's
                tensors missing, or bad metadata.
        """
        arch = meta.get("general.architecture")
        if not isinstance(arch, str) or arch not in ARCH_TRAITS:
            raise ModelFormatError(f"{source}: unknown architecture {arch!r} (supported: {', '.join(ARCH_TRAITS)})")
        traits = ARCH_TRAITS[arch]
        hp = ModelConfig.from_metadata(meta, source, n_vocab=n_vocab, rope_type=traits.rope_type)
        L = hp.n_layer

        def has(suffix: str) -> bool:
            return f"blk.0.{suffix}" in tensors

        present = {"qkv_bias": has("attn_q.bias"), "qk_norm": has(Q_NORM), "post_attn_norm": has(POST_ATTN_NORM),
                   "post_ffn_norm": has(POST_FFN_NORM), "rope_freqs": "rope_freqs.weight" in tensors,
                   "moe": has("ffn_gate_inp.weight")}
        allowed = traits.required | traits.optional
        on = {k: (k in traits.required) or (k in allowed and v) for k, v in present.items()}
        for k in ("qkv_bias", "qk_norm", "post_attn_norm", "post_ffn_norm", "moe"):
            if k in traits.required and not present[k]:
                raise ModelFormatError(f"{source}: architecture {arch!r} needs the {k} tensors "
                                       f"(blk.0 has none)")

        def num(key: str, default: float) -> float:
            v = meta.get(f"{arch}.{key}", default)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ModelFormatError(f"{source}: metadata key {arch}.{key} must be a finite number, got {v!r}")
            return float(v)

        window = [0] * L
        bases = [float(hp.rope_theta)] * L
        if arch == "gemma3":
            # llama.cpp llama-model.cpp LLM_ARCH_GEMMA3: swa pattern 6 (every 6th layer is global), local
            # layers use rope_freq_base_train_swa = 10000; HF Gemma3TextConfig.layer_types / rope_local_base_freq.
            sw = int(num("attention.sliding_window", 0))
            local_base = num("rope.freq_base_swa", 10000.0)
            for il in range(L):
                if sw and (il + 1) % 6 != 0:
                    window[il], bases[il] = sw, local_base
        scaling = RopeScaling()
        kind = meta.get(f"{arch}.rope.scaling.type", "none")
        if kind not in (None, "none") and not on["rope_freqs"]:
            if kind != "linear":
                raise ModelFormatError(f"{source}: RoPE scaling {kind!r} is not supported (supported: none, "
                                       f"linear, llama3 through rope_freqs)")
            scaling = RopeScaling("linear", num("rope.scaling.factor", 1.0),
                                  int(num("rope.scaling.original_context_length", 0)))
        n_expert = int(num("expert_count", 0)) if on["moe"] else 0
        spec = cls(
            hp=hp, arch=arch, rope_type=traits.rope_type, qkv_bias=on["qkv_bias"], qk_norm=on["qk_norm"],
            post_attn_norm=on["post_attn_norm"], post_ffn_norm=on["post_ffn_norm"],
            activation=ACTIVATIONS[traits.activation],
            embed_scale=math.sqrt(hp.n_embd) if "embed_scale" in traits.required else 1.0,
            attn_scale=(num("attention.query_pre_attn_scalar", hp.head_dim) ** -0.5) if arch == "gemma3" else 0.0,
            final_softcap=num("final_logit_softcapping", 0.0) if "final_softcap" in allowed else 0.0,
            attn_softcap=num("attn_logit_softcapping", 0.0) if "attn_softcap" in allowed else 0.0,
            layer_window=tuple(window), layer_rope_base=tuple(bases), rope_scaling=scaling,
            rope_freqs=on["rope_freqs"], tied_head="output.weight" not in tensors,
            n_expert=n_expert, n_expert_used=int(num("expert_used_count", 0)) if n_expert else 0,
            expert_norm=bool(meta.get(f"{arch}.expert_weights_norm", True)) if n_expert else False,
            n_ff_expert=int(num("expert_feed_forward_length", hp.n_ff)) if n_expert else 0,
        )
        return spec
