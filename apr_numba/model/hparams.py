"""Model hyper-parameters read from GGUF metadata (never from constants).

Key names follow llama.cpp's GGUF convention (``{arch}.block_count``, ``{arch}.embedding_length``...,
see gguf-py ``gguf/constants.py`` ``Keys.LLM`` / ``Keys.Attention`` / ``Keys.Rope``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from apr_numba.arch.traits import ARCH_TRAITS, ROPE_NEOX, ROPE_NORM  # noqa: F401 (re-exported)
from apr_numba.errors import ModelFormatError

# Decoder architectures with their RoPE style, derived from the one table (apr_numba.arch.traits).
SUPPORTED_ARCHS = {name: t.rope_type for name, t in ARCH_TRAITS.items()}


# Upper bounds that no real decoder reaches; a file claiming more is corrupt (and would make the loader
# allocate absurd buffers before any tensor check).
_LIMITS = {"n_layer": 1024, "n_embd": 1 << 16, "n_head": 1024, "n_head_kv": 1024, "n_ff": 1 << 18,
           "n_vocab": 1 << 22, "head_dim": 1024}


@dataclass
class ModelConfig:
    """Decoder-only transformer configuration.

    Attributes:
        arch: GGUF ``general.architecture`` ("llama", "qwen2").
        n_layer: number of transformer blocks.
        n_embd: hidden size D.
        n_head: query heads; ``n_head_kv``: key/value heads (GQA when smaller).
        n_ff: feed-forward (SwiGLU) inner size.
        n_vocab: vocabulary size (rows of ``token_embd``).
        n_ctx_train: context length the model was trained with.
        rope_theta: RoPE frequency base; ``rope_type``: ROPE_NORM or ROPE_NEOX.
        rms_eps: RMSNorm epsilon.
        head_dim: per-head size (``n_embd // n_head`` unless the file says otherwise).
        n_rep: query heads per KV head (``n_head // n_head_kv``), derived.
        name: ``general.name`` for display.
    """

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    rope_theta: float
    rope_type: int
    rms_eps: float
    head_dim: int = 0
    name: str = ""
    n_rep: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.n_embd // self.n_head
        import math

        if not (math.isfinite(self.rope_theta) and self.rope_theta > 1.0):
            raise ModelFormatError(f"{self.name or self.arch}: rope_theta = {self.rope_theta} must be finite and > 1")
        if not (math.isfinite(self.rms_eps) and 0.0 <= self.rms_eps < 1.0):
            raise ModelFormatError(f"{self.name or self.arch}: rms_eps = {self.rms_eps} must be in [0, 1)")
        for key, limit in _LIMITS.items():
            val = getattr(self, key)
            if not 1 <= val <= limit:
                raise ModelFormatError(f"{self.name or self.arch}: {key} = {val} is out of range [1, {limit}]")
        if self.n_head_kv <= 0 or self.n_head % self.n_head_kv:
            raise ModelFormatError(
                f"n_head ({self.n_head}) is not a multiple of n_head_kv ({self.n_head_kv})"
            )
        self.n_rep = self.n_head // self.n_head_kv

    @property
    def q_dim(self) -> int:
        """Width of the query projection output: n_head * head_dim."""
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the key (and value) projection output: n_head_kv * head_dim."""
        return self.n_head_kv * self.head_dim

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], source: str = "model", n_vocab: int | None = None,
                      rope_type: int | None = None) -> ModelConfig:
        """Build the config from GGUF metadata (a mapping of GGUF key -> Python value).

        ``n_vocab`` (e.g. the row count of ``token_embd``) is used when the metadata has neither
        ``{arch}.vocab_size`` nor the tokenizer's token list.

        Raises:
            ModelFormatError: unknown architecture or a required key missing / out of range;
                the message names ``source`` (the file).
        """
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED_ARCHS:
            raise ModelFormatError(
                f"{source}: unknown architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})"
            )

        def need(key: str, kind: type = int) -> Any:
            full = f"{arch}.{key}"
            if full not in meta:
                raise ModelFormatError(f"{source}: metadata key {full!r} is missing")
            try:
                val = kind(meta[full])
            except (TypeError, ValueError) as exc:
                raise ModelFormatError(f"{source}: metadata key {full!r} has bad value {meta[full]!r}") from exc
            if kind is int and not 0 < val < 1 << 31:
                raise ModelFormatError(f"{source}: metadata key {full!r} out of range: {val}")
            return val

        n_embd = need("embedding_length")
        n_head = need("attention.head_count")
        vocab = meta.get(f"{arch}.vocab_size")
        if vocab is None:
            toks = meta.get("tokenizer.ggml.tokens")
            vocab = len(toks) if toks is not None else n_vocab
        if not vocab:
            raise ModelFormatError(f"{source}: vocabulary size unknown (no {arch}.vocab_size, no tokens)")
        head_dim = int(meta.get(f"{arch}.attention.key_length", n_embd // n_head))
        return cls(
            arch=arch,
            n_layer=need("block_count"),
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=int(meta.get(f"{arch}.attention.head_count_kv", n_head)),
            n_ff=need("feed_forward_length"),
            n_vocab=int(vocab),
            n_ctx_train=need("context_length"),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_type=SUPPORTED_ARCHS[arch] if rope_type is None else rope_type,
            rms_eps=need("attention.layer_norm_rms_epsilon", float),
            head_dim=head_dim,
            name=str(meta.get("general.name", "")),
        )


def gguf_metadata(reader: Any) -> dict[str, Any]:
    """Convert a ``gguf.GGUFReader``'s fields into a plain dict of GGUF key -> Python value.

    Strings become ``str``, arrays become lists, scalars become int/float/bool.
    """
    out: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = fld.contents()
    return out
