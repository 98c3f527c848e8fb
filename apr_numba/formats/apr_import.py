"""Import a GGUF file or a Hugging Face safetensors directory into an APR v2 ``.apr`` file, losslessly.

GGUF: every tensor's bytes are copied unchanged with its GGML type as the dtype byte, its name mapped
as aprender maps it (:func:`apr_numba.formats.apr_meta.gguf_to_apr_name`) and its shape stored [out, in]
(GGUF ne reversed, no transpose). The config, the whole tokenizer (vocabulary, merges, token types,
special ids, pre-tokenizer, chat template) and every other GGUF key go into the metadata
(:func:`apr_numba.formats.apr_meta.gguf_to_apr_metadata`), so the ``.apr`` alone is enough to run.

Safetensors directory (``config.json`` + ``tokenizer.json`` + ``model.safetensors``): tensors keep
their names, shapes and bytes (F32 / F16 / BF16, and the integer buffers such as BERT's
``position_ids`` as GGML I8..I64 / F64); the config goes into aprender's keys plus ``hf.config``, the
tokenizer into ``tokenizer.vocabulary`` / ``tokenizer.merges`` / special ids plus ``hf.tokenizer_json``.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apr_numba.errors import ModelFormatError
from apr_numba.formats import apr_format as af
from apr_numba.formats.apr_meta import gguf_to_apr_metadata, gguf_to_apr_name
from apr_numba.model.hparams import SUPPORTED_ARCHS

# safetensors dtype -> APR dtype byte (GGML ids).
SAFETENSORS_DTYPES = {"F32": af.F32, "F16": af.F16, "BF16": af.BF16, "I8": af.I8, "I16": af.I16, "I32": af.I32,
                      "I64": af.I64, "F64": af.F64}
_ST_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "F64": 8}
MAX_SAFETENSORS_HEADER = 100 << 20


@dataclass
class ImportResult:
    """What an import wrote: output path, tensor count, tensor bytes, file bytes, seconds, header."""

    path: Path
    tensors: int
    tensor_bytes: int
    file_bytes: int
    seconds: float
    header: af.AprHeader


def default_output(src: Path) -> Path:
    """``model.gguf`` -> ``model.apr`` beside it; a directory ``d`` -> ``d.apr`` beside it."""
    return src.parent / (src.name + ".apr") if src.is_dir() else src.with_suffix(".apr")


def import_model(src: str | os.PathLike, out: str | os.PathLike | None = None, progress: bool = False) -> ImportResult:
    """Convert ``src`` (a ``.gguf`` file or a safetensors directory) to ``out`` (default
    :func:`default_output`). ``progress`` shows a tqdm byte bar on stderr.

    Raises:
        ModelFormatError: the source is missing, malformed, or holds a tensor type APR cannot store.
        AprError: the output cannot be written.
    """
    src = Path(src)
    out_path = Path(out) if out is not None else default_output(src)
    if src.is_dir():
        return import_safetensors_dir(src, out_path, progress)
    if not src.is_file():
        raise ModelFormatError(f"{src}: no such file or directory")
    with open(src, "rb") as fh:
        magic = fh.read(4)
    if magic == b"GGUF":
        return import_gguf(src, out_path, progress)
    raise ModelFormatError(f"{src}: not a GGUF file (magic {magic!r}) or a safetensors directory")


def _write(out: Path, meta: dict[str, Any], specs: list, progress: bool, desc: str, t0: float) -> ImportResult:
    from tqdm import tqdm

    total = sum(np.asarray(s[3]).nbytes if isinstance(s[3], np.ndarray) else memoryview(s[3]).nbytes for s in specs)
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress, leave=False) as bar:
        header = af.write_apr(out, meta, specs, progress=bar.update)
    return ImportResult(out, len(specs), total, out.stat().st_size, time.perf_counter() - t0, header)


def import_gguf(src: Path, out: Path, progress: bool = False) -> ImportResult:
    """GGUF file -> ``.apr`` (see module docstring).

    Raises:
        ModelFormatError: malformed GGUF, a tensor type APR cannot store, two names mapping to one.
    """
    from apr_numba.formats.gguf_header import read_gguf

    t0 = time.perf_counter()
    meta_in, table = read_gguf(src)  # every count, length and extent checked; ~30x faster than GGUFReader
    mm = np.memmap(src, dtype=np.uint8, mode="r")
    specs, seen = [], {}
    for name, t in table.items():
        if t.ggml_type not in af.DTYPE_NAMES:
            raise ModelFormatError(f"{src}: tensor {name} has GGML type {t.type_name}, which APR v2 cannot store")
        aname = gguf_to_apr_name(name)
        if aname in seen:
            raise ModelFormatError(f"{src}: tensors {seen[aname]!r} and {name!r} both map to {aname!r}")
        seen[aname] = name
        specs.append((aname, t.ggml_type, t.shape, mm[t.offset:t.offset + t.nbytes]))
    emb = table.get("token_embd.weight")
    meta = gguf_to_apr_metadata(meta_in, source=src.name, n_vocab=emb.shape[0] if emb is not None else None,
                                tied="output.weight" not in table,
                                dtype_counts=Counter(t.type_name for t in table.values()))
    return _write(out, meta, specs, progress, f"import {src.name}", t0)


def read_safetensors(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], dict[str, Any]]:
    """Parse and validate a ``.safetensors`` header (by hand, not with the ``safetensors`` library:
    the library (checked with safetensors 0.8) exposes names, dtypes, shapes and ``offset_keys()`` order but
    not the byte offsets that the zero-copy memory-mapped views need; its ``get_tensor`` copies each tensor into
    RAM, and its NumPy framework raises ``TypeError: data type 'bfloat16' not understood`` on BF16 tensors; and
    its header errors name neither the file nor the tensor (``invalid shape, data type, or offset for tensor``).
    ``tests/test_apr_import.py`` checks the imported bytes against ``safetensors.numpy.load_file``.)

    Returns:
        (name -> (dtype, shape, absolute start, absolute end), the ``__metadata__`` object or {}).

    Raises:
        ModelFormatError: truncated file, header length past the end or over 100 MiB, header not a JSON
            object, an entry with a bad dtype / shape / offsets, or bytes that disagree with the shape.
    """
    size = path.stat().st_size
    if size < 8:
        raise ModelFormatError(f"{path}: file of {size} bytes is shorter than the safetensors header length")
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > size - 8 or n > MAX_SAFETENSORS_HEADER:
            raise ModelFormatError(f"{path}: safetensors header of {n} bytes runs past the end of the file "
                                   f"({size} bytes) or over {MAX_SAFETENSORS_HEADER} bytes")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelFormatError(f"{path}: safetensors header is not JSON ({str(exc)[:200]})") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: safetensors header is not a JSON object")
    base, data_size = 8 + n, size - 8 - n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            a, b = int(a), int(b)
        except (TypeError, KeyError, ValueError) as exc:
            raise ModelFormatError(f"{path}: tensor {name!r}: malformed header entry ({exc})") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise ModelFormatError(f"{path}: tensor {name!r} has dtype {dtype}, which APR v2 cannot store "
                                   f"(supported: {', '.join(SAFETENSORS_DTYPES)})")
        if any(d < 0 for d in shape) or not 0 <= a <= b <= data_size:
            raise ModelFormatError(f"{path}: tensor {name!r}: shape {list(shape)} / offsets [{a}, {b}] outside "
                                   f"the {data_size}-byte data section")
        if af.element_count(shape) * _ST_ITEMSIZE[dtype] != b - a:
            raise ModelFormatError(f"{path}: tensor {name!r}: {b - a} bytes disagree with shape {list(shape)} "
                                   f"of {dtype}")
        out[name] = (dtype, shape, base + a, base + b)
    meta = header.get("__metadata__")
    return out, meta if isinstance(meta, dict) else {}


def _hf_tokenizer_meta(tok: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """aprender's tokenizer keys from a ``tokenizer.json`` object (vocabulary by id, merges, ids)."""
    model = tok.get("model") if isinstance(tok.get("model"), dict) else {}
    vocab = dict(model.get("vocab") or {}) if isinstance(model.get("vocab"), dict) else {}
    if isinstance(model.get("vocab"), list):  # Unigram: [[piece, score], ...]
        vocab = {p[0]: i for i, p in enumerate(model["vocab"])}
    for t in tok.get("added_tokens") or []:
        if isinstance(t, dict) and isinstance(t.get("content"), str) and isinstance(t.get("id"), int):
            vocab[t["content"]] = t["id"]
    out: dict[str, Any] = {}
    if vocab:
        size = max(vocab.values()) + 1
        words = [""] * size
        for w, i in vocab.items():
            words[i] = w
        out["tokenizer.vocabulary"] = words
    merges = model.get("merges")
    if isinstance(merges, list) and merges:
        out["tokenizer.merges"] = [m if isinstance(m, str) else " ".join(m) for m in merges]
    if isinstance(model.get("type"), str):
        out["tokenizer.model"] = model["type"].lower()
    for key in ("bos_token_id", "eos_token_id"):
        if isinstance(cfg.get(key), int):
            out[f"tokenizer.{key}"] = cfg[key]
    return out


def import_safetensors_dir(src: Path, out: Path, progress: bool = False) -> ImportResult:
    """HF directory (``config.json``, ``tokenizer.json``, ``model.safetensors``) -> ``.apr``.

    Raises:
        ModelFormatError: a file missing or malformed, a dtype APR cannot store.
    """
    t0 = time.perf_counter()
    files = {n: src / n for n in ("config.json", "tokenizer.json", "model.safetensors")}
    for n, p in files.items():
        if not p.is_file():
            raise ModelFormatError(f"{src}: {n} is missing (a safetensors model directory needs config.json, "
                                   f"tokenizer.json and model.safetensors)")
    try:
        cfg = json.loads(files["config.json"].read_text(encoding="utf-8"))
        tok_text = files["tokenizer.json"].read_text(encoding="utf-8")
        tok = json.loads(tok_text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelFormatError(f"{src}: config.json or tokenizer.json is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict) or not isinstance(tok, dict):
        raise ModelFormatError(f"{src}: config.json and tokenizer.json must be JSON objects")
    table, st_meta = read_safetensors(files["model.safetensors"])
    mm = np.memmap(files["model.safetensors"], dtype=np.uint8, mode="r")
    specs = [(name, SAFETENSORS_DTYPES[dt], shape, mm[a:b]) for name, (dt, shape, a, b) in table.items()]
    mt = cfg.get("model_type")
    heads = cfg.get("num_attention_heads")
    meta: dict[str, Any] = {"model_type": mt, "name": cfg.get("_name_or_path") or src.name, "architecture": mt,
                            "hidden_size": cfg.get("hidden_size"), "num_layers": cfg.get("num_hidden_layers"),
                            "num_heads": heads, "num_kv_heads": cfg.get("num_key_value_heads", heads),
                            "vocab_size": cfg.get("vocab_size"), "intermediate_size": cfg.get("intermediate_size"),
                            "max_position_embeddings": cfg.get("max_position_embeddings"),
                            "rope_theta": cfg.get("rope_theta"),
                            "rope_type": SUPPORTED_ARCHS.get(mt) if isinstance(mt, str) else None,
                            "rms_norm_eps": cfg.get("rms_norm_eps", cfg.get("layer_norm_eps")),
                            "head_dim": cfg.get("head_dim")}
    if meta["head_dim"] is None and isinstance(heads, int) and heads and isinstance(cfg.get("hidden_size"), int):
        meta["head_dim"] = cfg["hidden_size"] // heads
    meta = {k: v for k, v in meta.items() if v is not None}
    special = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if isinstance(cfg.get(k), int)}
    if special:
        meta["special_tokens"] = special
    meta.update(source=src.name, original_format="safetensors",
                quantization={"tensor_types": dict(Counter(dt for dt, _, _, _ in table.values()))})
    meta.update(_hf_tokenizer_meta(tok, cfg))
    meta["tied_embeddings"] = bool(cfg.get("tie_word_embeddings", "lm_head.weight" not in table))
    meta["hf.config"] = cfg
    meta["hf.tokenizer_json"] = tok_text
    if st_meta:
        meta["hf.safetensors_metadata"] = st_meta
    return _write(out, meta, specs, progress, f"import {src.name}", t0)
