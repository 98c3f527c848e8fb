"""Encoder weights and config: ``config.json`` -> :class:`EncoderConfig`, HF-named tensors -> packed weights.

A *source* (see :mod:`apr_numba.model.weights`) has ``path``, ``metadata``, ``tensors`` (name -> object with
``ggml_type`` and ``shape``) and ``data(name) -> uint8`` raw bytes. For an encoder the tensor names are
HF's (``embeddings.word_embeddings.weight``, ``encoder.layer.N.attention.self.query.weight`` ...,
optionally prefixed ``bert.``; TF-era ``LayerNorm.gamma/beta`` are accepted) and the HF config is the
metadata itself or a dict / JSON string under one of :data:`CONFIG_KEYS`; the tokenizer is the text of
``tokenizer.json`` as a ``tokenizer_json`` attribute or under one of :data:`TOKENIZER_KEYS` (searched in
``metadata``, an .apr's stored ``apr_metadata`` and its ``custom`` object). That is
all an ``.apr`` reader has to provide (:func:`open_encoder_source`).

Matrices are packed with :func:`apr_numba.quants.repack.pack` (F32 kept exact, F16/BF16 widened exactly,
GGML-quantized types decoded losslessly); embedding tables, biases and LayerNorm weights become float32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apr_numba.errors import ModelFormatError
from apr_numba.kernels.matmul import packed_tuple
from apr_numba.quants.layouts import FAMILY_F32, decode_codes
from apr_numba.quants.repack import PackedMatrix, pack

_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
             "max_position_embeddings")
CONFIG_KEYS = ("hf.config", "hf_config", "config", "config.json")  # where an .apr keeps config.json
TOKENIZER_KEYS = ("tokenizer_json", "hf.tokenizer_json", "tokenizer.json", "tokenizer.huggingface.json")


@dataclass(frozen=True)
class EncoderConfig:
    """Hyper-parameters from HF ``config.json`` (``BertConfig`` names in brackets).

    n_layer [num_hidden_layers], n_embd [hidden_size], n_head [num_attention_heads], head_dim
    (n_embd / n_head), n_ff [intermediate_size], n_vocab [vocab_size], n_pos [max_position_embeddings],
    n_types [type_vocab_size, default 2], eps [layer_norm_eps, default 1e-12], arch [model_type].
    """

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    head_dim: int
    n_ff: int
    n_vocab: int
    n_pos: int
    n_types: int
    eps: float

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], where: str = "config.json") -> EncoderConfig:
        """Validate a ``config.json`` dict.

        Raises:
            ModelFormatError: missing keys (all named), non-positive sizes, hidden_size not divisible by
                the head count, an unsupported model_type, activation or position embedding type.
        """
        from apr_numba.model.hparams import meta_value

        missing = [k for k in _REQUIRED if k not in cfg]
        if missing:
            raise ModelFormatError(f"{where}: missing config keys: {', '.join(missing)}")
        arch = cfg.get("model_type", "bert")
        if arch != "bert":
            raise ModelFormatError(f"{where}: model_type {arch!r} is not a supported encoder (bert)")
        act = cfg.get("hidden_act", "gelu")
        if act != "gelu":
            raise ModelFormatError(f"{where}: hidden_act {act!r} is not supported (exact 'gelu' only)")
        pet = cfg.get("position_embedding_type", "absolute")
        if pet != "absolute":
            raise ModelFormatError(f"{where}: position_embedding_type {pet!r} is not supported ('absolute')")
        v = {k: meta_value(cfg, k, "int", where) for k in _REQUIRED}  # an integer each: not "384", 1e309, [384]
        n_types = meta_value(cfg, "type_vocab_size", "int", where, 2)
        eps = meta_value(cfg, "layer_norm_eps", "float", where, 1e-12)
        if min(v.values()) < 1 or n_types < 1 or not eps >= 0:
            raise ModelFormatError(f"{where}: sizes must be >= 1 and layer_norm_eps >= 0: {v}")
        big = {k: x for k, x in v.items() if x >= 1 << 31}
        if big:
            raise ModelFormatError(f"{where}: config sizes out of range: {big}")
        D, H = v["hidden_size"], v["num_attention_heads"]
        if D % H:
            raise ModelFormatError(f"{where}: hidden_size {D} is not a multiple of num_attention_heads {H}")
        return cls(arch, v["num_hidden_layers"], D, H, D // H, v["intermediate_size"], v["vocab_size"],
                   v["max_position_embeddings"], n_types, eps)


@dataclass
class Dense:
    """A dense layer ``y = x @ W.T + bias`` (``torch.nn.Linear``), rows R = output features.

    Attributes:
        w: float32 (R, C) row-major weights when every source matrix is F32/F16/BF16 (kept exact; run by
            :func:`apr_numba.kernels.encoder.linear`), else None.
        packed: when quantized, 1 to 3 :class:`PackedMatrix` stacked along R (Q, K, V share one call of
            :func:`apr_numba.kernels.matmul.matmul3`); empty otherwise. tuples: their kernel tuples.
        bias: float32 (R,).
    """

    w: np.ndarray | None
    packed: list[PackedMatrix]
    tuples: tuple
    bias: np.ndarray

    @property
    def nbytes(self) -> int:
        return int((self.w.nbytes if self.w is not None else sum(p.nbytes for p in self.packed)) + self.bias.nbytes)


@dataclass
class EncoderLayer:
    """One ``BertLayer``: qkv (fused Q, K, V: R = 3 D), o (attention output), inter (D -> F), out (F -> D),
    and the two LayerNorms' float32 (D,) weights and biases."""

    qkv: Dense
    o: Dense
    inter: Dense
    out: Dense
    ln1_w: np.ndarray
    ln1_b: np.ndarray
    ln2_w: np.ndarray
    ln2_b: np.ndarray


@dataclass
class EncoderWeights:
    """word (V, D), pos (P, D), types (n_types, D), emb_ln_w/b (D,) float32; layers; types seen."""

    word: np.ndarray
    pos: np.ndarray
    types: np.ndarray
    emb_ln_w: np.ndarray
    emb_ln_b: np.ndarray
    layers: list[EncoderLayer]
    quant_mix: dict[str, int]

    @property
    def nbytes(self) -> int:
        """Resident bytes of all weights (tables, matrices, vectors)."""
        n = sum(a.nbytes for a in (self.word, self.pos, self.types, self.emb_ln_w, self.emb_ln_b))
        for ly in self.layers:
            n += sum(d.nbytes for d in (ly.qkv, ly.o, ly.inter, ly.out)) + 4 * ly.ln1_w.nbytes
        return int(n)


class _Names:
    """HF tensor names with the checkpoint's prefix ('' or 'bert.') and LayerNorm gamma/beta aliases."""

    def __init__(self, src):
        self.src = src
        self.mix: dict[str, int] = {}
        self.prefix = "" if "embeddings.word_embeddings.weight" in src.tensors else next(
            (p for p in ("bert.", "model.") if p + "embeddings.word_embeddings.weight" in src.tensors), "")

    def get(self, name: str, shape: tuple[int, ...]):
        full = self.prefix + name
        if full not in self.src.tensors and "LayerNorm." in full:
            alt = full.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
            full = alt if alt in self.src.tensors else full
        t = self.src.tensors.get(full)
        if t is None:
            raise ModelFormatError(f"{self.src.path}: required tensor {full!r} is missing")
        if tuple(t.shape) != shape:
            raise ModelFormatError(f"{self.src.path}: tensor {full} has shape {tuple(t.shape)}, expected {shape}")
        tn = getattr(t, "type_name", str(t.ggml_type))
        self.mix[tn] = self.mix.get(tn, 0) + 1
        return full, t

    def codes(self, name: str, shape: tuple[int, ...]):
        full, t = self.get(name, shape)
        rows = shape[0] if len(shape) == 2 else 1
        return decode_codes(t.ggml_type, self.src.data(full), (rows, shape[-1]), f"{self.src.path}: {full}")

    def floats(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        return np.ascontiguousarray(self.codes(name, shape).dequantize().reshape(shape), dtype=np.float32)

    def dense(self, names: list[str], rows: int, cols: int) -> Dense:
        """``names`` are the weight tensors stacked along rows (bias: same name with ``.bias``)."""
        cs = [self.codes(n + ".weight", (rows, cols)) for n in names]
        bias = np.concatenate([self.floats(n + ".bias", (rows,)) for n in names])
        if all(c.family == FAMILY_F32 for c in cs):
            w = np.ascontiguousarray(np.concatenate([c.codes for c in cs]) if len(cs) > 1 else cs[0].codes,
                                     dtype=np.float32)
            return Dense(w, [], (), bias)
        pk = [pack(c) for c in cs]
        return Dense(None, pk, tuple(packed_tuple(p) for p in pk), bias)


def load_encoder_weights(src, cfg: EncoderConfig) -> EncoderWeights:
    """Read, validate and prepare every tensor of the encoder from a source with HF tensor names.

    Raises:
        ModelFormatError: a tensor is missing (named), has the wrong shape, or an unsupported type.
    """
    nm = _Names(src)
    D, F = cfg.n_embd, cfg.n_ff
    e = "embeddings."
    word = nm.floats(e + "word_embeddings.weight", (cfg.n_vocab, D))
    pos = nm.floats(e + "position_embeddings.weight", (cfg.n_pos, D))
    types = nm.floats(e + "token_type_embeddings.weight", (cfg.n_types, D))
    ln_w, ln_b = nm.floats(e + "LayerNorm.weight", (D,)), nm.floats(e + "LayerNorm.bias", (D,))
    layers = []
    for i in range(cfg.n_layer):
        p = f"encoder.layer.{i}."
        a, s = p + "attention.", p + "attention.self."
        layers.append(EncoderLayer(
            nm.dense([s + "query", s + "key", s + "value"], D, D), nm.dense([a + "output.dense"], D, D),
            nm.dense([p + "intermediate.dense"], F, D), nm.dense([p + "output.dense"], D, F),
            nm.floats(a + "output.LayerNorm.weight", (D,)), nm.floats(a + "output.LayerNorm.bias", (D,)),
            nm.floats(p + "output.LayerNorm.weight", (D,)), nm.floats(p + "output.LayerNorm.bias", (D,))))
    return EncoderWeights(word, pos, types, ln_w, ln_b, layers, dict(nm.mix))


def _meta_dicts(src) -> list[dict[str, Any]]:
    """The metadata dicts of a source to search: ``metadata``, then an .apr's stored ``apr_metadata`` and
    its ``custom`` object (where :mod:`apr_numba.formats.apr_import` keeps ``hf.config`` / ``hf.tokenizer_json``)."""
    out = []
    for d in (getattr(src, "metadata", None), getattr(src, "apr_metadata", None)):
        if isinstance(d, dict):
            out.append(d)
            if isinstance(d.get("custom"), dict):
                out.append(d["custom"])
    return out


def meta_value(src, keys: tuple[str, ...]):
    """The first non-empty value under one of ``keys`` in a source's metadata dicts, or None."""
    for d in _meta_dicts(src):
        for k in keys:
            if d.get(k):
                return d[k]
    return None


def source_config(src) -> dict[str, Any]:
    """The HF config dict of a source: a dict / JSON string kept under one of :data:`CONFIG_KEYS` (an
    .apr from ``apr-numba import`` stores ``hf.config``), else its ``metadata`` itself when that is a
    ``config.json`` (HF directory).

    Raises:
        ModelFormatError: no config found or not valid JSON.
    """
    v = meta_value(src, CONFIG_KEYS)
    meta = getattr(src, "metadata", None) or {}
    if v is None and "num_hidden_layers" in meta:
        return meta
    if isinstance(v, (str, bytes)):
        try:
            v = json.loads(v)
        except (ValueError, RecursionError) as exc:
            raise ModelFormatError(f"{src.path}: encoder config is not valid JSON ({type(exc).__name__}: "
                                   f"{str(exc)[:200]})") from None
    if not isinstance(v, dict):
        raise ModelFormatError(f"{src.path}: no encoder config (HF config.json) in this model")
    return v


def open_encoder_source(path: Path):
    """Open an encoder model: a HF directory, or an ``.apr`` file (tensors by HF name).

    The .apr hook: :class:`apr_numba.formats.apr_file.AprFile` is used as a source as is; its config is found by
    :func:`source_config`, its tokenizer as ``tokenizer_json`` (attribute or metadata key).

    Raises:
        ModelFormatError: not a directory or .apr file, or the .apr reader is unavailable.
    """
    path = Path(path)
    if path.is_dir():
        from apr_numba.formats.safetensors_dir import SafetensorsDir

        return SafetensorsDir(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: no such model file or directory")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic == b"APR\x00":
        try:
            from apr_numba.formats.apr_file import AprFile
        except ImportError as exc:
            raise ModelFormatError(f"{path}: .apr files are not supported by this build") from exc
        return AprFile(path)
    raise ModelFormatError(f"{path}: not an encoder model (expected a HF directory with config.json and "
                           f"model.safetensors, or an .apr file; magic {magic!r})")
