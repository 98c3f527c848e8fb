"""Model hyper-parameters read from GGUF metadata (never from constants).

Key names follow llama.cpp's GGUF convention (``{arch}.block_count``, ``{arch}.embedding_length``...,
see gguf-py ``gguf/constants.py`` ``Keys.LLM`` / ``Keys.Attention`` / ``Keys.Rope``).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from apr_numba.arch.traits import ARCH_TRAITS, ROPE_NEOX, ROPE_NORM  # noqa: F401 (re-exported)
from apr_numba.errors import ArgumentError, ModelFormatError

# Decoder architectures with their RoPE style, derived from the one table (apr_numba.arch.traits).
SUPPORTED_ARCHS = {name: t.rope_type for name, t in ARCH_TRAITS.items()}


# Upper bounds that no real decoder reaches; a file claiming more is corrupt (and would make the loader
# allocate absurd buffers before any tensor check).
_LIMITS = {"n_layer": 1024, "n_embd": 1 << 16, "n_head": 1024, "n_head_kv": 1024, "n_ff": 1 << 18,
           "n_vocab": 1 << 22, "head_dim": 1024}


_MISSING = object()
META_KINDS = ("int", "float", "str", "bool", "str_list", "int_list")


def _kind_ok(val: Any, kind: str) -> bool:
    if kind == "int":
        return type(val) is int or (isinstance(val, numbers.Integral) and not isinstance(val, bool))
    if kind == "float":
        return (isinstance(val, numbers.Real) and not isinstance(val, bool) and math.isfinite(float(val)))
    if kind == "str":
        return isinstance(val, str)
    if kind in ("str_list", "int_list"):  # one check per distinct item type (152k-token vocabularies)
        if not isinstance(val, (list, tuple)):
            return False
        want = str if kind == "str_list" else numbers.Integral
        return all(issubclass(t, want) and t is not bool for t in set(map(type, val)))
    raise AssertionError(kind)


def _describe(val: Any) -> str:
    if isinstance(val, (list, tuple)):
        return f"a list of {len(val)} items"
    r = repr(val)
    return f"{type(val).__name__} {r[:60]}{'...' if len(r) > 60 else ''}"


def meta_value(meta: Mapping[str, Any], key: str, kind: str, source: str, default: Any = _MISSING) -> Any:
    """The value of GGUF metadata key ``key``, checked to be of ``kind`` (llama.cpp ``GGUFMeta::get_kv``
    refuses a key of the wrong type the same way).

    Kinds: ``"int"`` (an integer, not a bool), ``"float"`` (a finite int or float, returned as float),
    ``"str"``, ``"bool"`` (a bool, the integers 0/1, or the strings "true"/"false" in any case),
    ``"str_list"``, ``"int_list"`` (lists of those).

    Returns:
        the value (a Python int / float / str / bool / list), or ``default`` when the key is absent.

    Raises:
        ModelFormatError: the key is absent and there is no default, or its value has the wrong type
            (a string where a number belongs, a list where a scalar belongs, an infinite float...); the
            message names ``source`` (the file) and the key.
    """
    if key not in meta or meta[key] is None:
        if default is _MISSING:
            raise ModelFormatError(f"{source}: metadata key {key!r} is missing")
        return default
    val = meta[key]
    if kind == "bool":
        if isinstance(val, bool):
            return val
        if isinstance(val, numbers.Integral) and int(val) in (0, 1):
            return bool(val)
        if isinstance(val, str) and val.strip().lower() in ("true", "false"):
            return val.strip().lower() == "true"
        raise ModelFormatError(f"{source}: metadata key {key!r} must be a boolean, got {_describe(val)}")
    if not _kind_ok(val, kind):
        want = {"int": "an integer", "float": "a finite number", "str": "a string",
                "str_list": "a list of strings", "int_list": "a list of integers"}[kind]
        mixed = " (it holds non-string items)" if kind == "str_list" and isinstance(val, (list, tuple)) else ""
        raise ModelFormatError(f"{source}: metadata key {key!r} must be {want}, got {_describe(val)}{mixed}")
    if kind == "int":
        return int(val)
    if kind == "float":
        return float(val)
    return val


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
        source: the file the config came from (named in error messages).

    Raises (constructor):
        ModelFormatError: a size out of range, rope_theta not finite and > 1, rms_eps outside [0, 1),
            n_head not a multiple of n_head_kv; the message names ``source``.
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
    source: str = field(default="", compare=False)  # where it was read from: not part of the config

    def __post_init__(self) -> None:
        where = self.source or self.name or self.arch
        for key, limit in _LIMITS.items():
            val = getattr(self, key)
            if key == "head_dim" and val == 0:
                continue
            if not 1 <= val <= limit:
                raise ModelFormatError(f"{where}: {key} = {val} is out of range [1, {limit}]")
        if self.head_dim == 0:
            self.head_dim = self.n_embd // self.n_head
            if self.head_dim < 1:
                raise ModelFormatError(f"{where}: n_embd {self.n_embd} is smaller than n_head {self.n_head}")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 1.0):
            raise ModelFormatError(f"{where}: rope_theta = {self.rope_theta} must be finite and > 1")
        if not (math.isfinite(self.rms_eps) and 0.0 <= self.rms_eps < 1.0):
            raise ModelFormatError(f"{where}: rms_eps = {self.rms_eps} must be in [0, 1)")
        if self.n_head % self.n_head_kv:
            raise ModelFormatError(f"{where}: n_head ({self.n_head}) is not a multiple of n_head_kv "
                                   f"({self.n_head_kv})")
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
        ``{arch}.vocab_size`` nor the tokenizer's token list. Every key is type-checked
        (:func:`meta_value`) and the attention geometry is cross-checked (:func:`attention_geometry`).

        Raises:
            ModelFormatError: unknown architecture, a required key missing, of the wrong type or out of
                range, or keys that contradict each other; the message names ``source`` (the file).
        """
        arch = meta_value(meta, "general.architecture", "str", source)
        if arch not in SUPPORTED_ARCHS:
            raise ModelFormatError(
                f"{source}: unknown architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})"
            )

        def need(key: str, kind: str = "int", default: Any = _MISSING) -> Any:
            full = f"{arch}.{key}"
            val = meta_value(meta, full, kind, source, default)
            if kind == "int" and val is not None and not 0 < val < 1 << 31:
                raise ModelFormatError(f"{source}: metadata key {full!r} out of range: {val}")
            return val

        n_embd = need("embedding_length")
        n_head = need("attention.head_count")
        n_head_kv = need("attention.head_count_kv", default=n_head)
        vocab = need("vocab_size", default=None)
        if vocab is None:
            toks = meta.get("tokenizer.ggml.tokens")
            vocab = len(toks) if isinstance(toks, (list, tuple)) else n_vocab
        if not vocab:
            raise ModelFormatError(f"{source}: vocabulary size unknown (no {arch}.vocab_size, no tokens)")
        head_dim = attention_geometry(
            n_embd, n_head, n_head_kv, key_length=need("attention.key_length", default=None),
            value_length=need("attention.value_length", default=None),
            rope_dim=need("rope.dimension_count", default=None), source=source, arch=arch)
        return cls(
            arch=arch,
            n_layer=need("block_count"),
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=n_head_kv,
            n_ff=need("feed_forward_length"),
            n_vocab=int(vocab),
            n_ctx_train=need("context_length"),
            rope_theta=need("rope.freq_base", "float", 10000.0),
            rope_type=SUPPORTED_ARCHS[arch] if rope_type is None else rope_type,
            rms_eps=need("attention.layer_norm_rms_epsilon", "float"),
            head_dim=head_dim,
            name=meta_value(meta, "general.name", "str", source, ""),
            source=source,
        )


def attention_geometry(n_embd: int, n_head: int, n_head_kv: int, *, key_length: int | None = None,
                       value_length: int | None = None, rope_dim: int | None = None, source: str = "model",
                       arch: str = "llama") -> int:
    """Check the attention geometry stated by metadata keys against each other; return head_dim.

    Keys (llama.cpp ``llama_model::load_hparams``): ``{arch}.attention.head_count`` (n_head),
    ``head_count_kv`` (n_head_kv), ``embedding_length`` (n_embd), ``attention.key_length`` /
    ``value_length`` (per-head K / V width, default n_embd / n_head) and ``rope.dimension_count``
    (rotated width per head, default head_dim). This engine rotates the whole head and uses one head
    width for K and V, so a file whose keys disagree (e.g. head counts doubled, which still fits the
    matrix shapes when n_embd is divisible) is refused instead of producing garbage.

    Raises:
        ModelFormatError: n_head not a multiple of n_head_kv, n_embd not a multiple of n_head (without
            key_length), value_length != key_length, rope.dimension_count != head_dim or odd; the
            message names ``source`` and the keys.
    """
    if n_head_kv < 1 or n_head % n_head_kv:
        raise ModelFormatError(f"{source}: {arch}.attention.head_count {n_head} is not a multiple of "
                               f"{arch}.attention.head_count_kv {n_head_kv}")
    if key_length is None:
        if n_embd % n_head:
            raise ModelFormatError(f"{source}: {arch}.embedding_length {n_embd} is not a multiple of "
                                   f"{arch}.attention.head_count {n_head} (and no attention.key_length)")
        head_dim = n_embd // n_head
    else:
        head_dim = key_length
    if value_length is not None and value_length != head_dim:
        raise ModelFormatError(f"{source}: {arch}.attention.value_length {value_length} differs from the key "
                               f"head size {head_dim} (unsupported)")
    if head_dim % 2:
        raise ModelFormatError(f"{source}: head size {head_dim} is odd (RoPE rotates pairs)")
    if rope_dim is not None and rope_dim != head_dim:
        raise ModelFormatError(f"{source}: {arch}.rope.dimension_count {rope_dim} disagrees with the head size "
                               f"{head_dim} ({arch}.embedding_length {n_embd} / head_count {n_head}"
                               f"{'' if key_length is None else ', attention.key_length'}): inconsistent "
                               f"attention geometry (partial rotary is not supported)")
    return head_dim


def mem_available() -> int:
    """Bytes an allocation may take: ``$APR_NUMBA_MAX_ALLOC`` (bytes) if set, else ``MemAvailable`` of
    /proc/meminfo, else (no /proc) 2**62."""
    cap = os.environ.get("APR_NUMBA_MAX_ALLOC")
    if cap:
        try:
            return int(cap)
        except ValueError:
            raise ArgumentError(f"APR_NUMBA_MAX_ALLOC={cap!r} is not a byte count") from None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 62


def context_bytes(cfg: ModelConfig, n_ctx: int, n_rope_tables: int = 1) -> int:
    """Bytes that a context of ``n_ctx`` positions allocates: ``n_rope_tables`` RoPE tables (float64 angles
    while building, then float32 cos and sin, each n_ctx x head_dim/2) and the float32 K and V caches
    (2 x n_layer x n_ctx x kv_dim)."""
    half = cfg.head_dim // 2
    rope = n_rope_tables * n_ctx * half * (8 + 8 + 4 + 4)
    kv = 2 * cfg.n_layer * n_ctx * cfg.kv_dim * 4
    return rope + kv


def check_n_ctx(n_ctx: Any, cfg: ModelConfig, default: int, n_rope_tables: int = 1) -> int:
    """Validate a requested context length before anything is allocated for it.

    Args:
        n_ctx: the request (None for ``min(default, cfg.n_ctx_train)``).
        cfg: the model's config (``n_ctx_train`` bounds the request).
        default: the default context length.
        n_rope_tables: RoPE tables the model builds (one per distinct per-layer base).

    Returns:
        the context length in positions.

    Raises:
        ArgumentError: not an integer, outside [1, n_ctx_train], or the RoPE tables and KV cache it needs
            (:func:`context_bytes`) exceed the memory available (:func:`mem_available`).
    """
    if n_ctx is None:
        ctx = min(default, cfg.n_ctx_train)
    elif isinstance(n_ctx, numbers.Integral) and not isinstance(n_ctx, bool):
        ctx = int(n_ctx)
    else:
        raise ArgumentError(f"n_ctx must be an integer, got {n_ctx!r}")
    if not 1 <= ctx <= max(cfg.n_ctx_train, 1):
        raise ArgumentError(f"n_ctx must be in [1, {cfg.n_ctx_train}], got {ctx}")
    need, avail = context_bytes(cfg, ctx, n_rope_tables), mem_available()
    if need > avail:
        raise ArgumentError(f"n_ctx {ctx} needs {need / 2**30:.2f} GiB for the RoPE tables and KV cache of "
                            f"{cfg.source or cfg.name}, more than the {avail / 2**30:.2f} GiB available")
    return ctx


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
