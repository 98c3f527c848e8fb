"""Open a Hugging Face model directory (config.json, tokenizer.json, model.safetensors) as a model *source*.

A source is what the weight loaders read (see :mod:`apr_numba.model.weights`): ``path``, ``metadata``,
``tensors`` (name -> :class:`~apr_numba.formats.mapped.TensorRef` with a GGML type id and NumPy shape) and
``data(name) -> uint8`` raw bytes. Here ``metadata`` is the parsed ``config.json`` and tensor names are
the checkpoint's own (HF) names; ``tokenizer_json`` is the text of ``tokenizer.json``.

The safetensors format (https://huggingface.co/docs/safetensors, "Format"): an 8-byte little-endian
u64 ``N``, then ``N`` bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, ...,
"__metadata__": {...}}``, then the data; offsets are relative to the byte after the header. The header
is read here directly and the data memory-mapped, so tensor bytes are zero-copy views and BF16 (which
NumPy, and so ``safetensors``' NumPy API, cannot represent) is handled like F16/F32 by
:func:`apr_numba.quants.layouts.decode_codes`. The tests cross-check the bytes against
``safetensors.safe_open``. Sharded checkpoints (``model.safetensors.index.json``) are supported.

Only floating tensors (F32, F16, BF16) enter ``tensors``; integer buffers such as BERT's
``embeddings.position_ids`` are listed in ``skipped``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T

from apr_numba.errors import ModelFormatError
from apr_numba.formats.mapped import TensorRef

ST_DTYPES = {"F32": (int(T.F32), 4), "F16": (int(T.F16), 2), "BF16": (int(T.BF16), 2)}
_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """Parse a .safetensors header. Returns (header dict, data start byte, file size).

    Parsed by hand rather than with the ``safetensors`` library: it (checked with safetensors 0.8) exposes
    names, dtypes, shapes and ``offset_keys()`` order but not the byte offsets that the zero-copy memory-mapped
    views need; its ``get_tensor`` copies each tensor into RAM, and its NumPy framework raises ``TypeError: data
    type 'bfloat16' not understood`` on BF16 tensors; and its header errors name neither the file nor the
    tensor (``invalid shape, data type, or offset for tensor``). ``tests/test_encoder.py`` checks the bytes
    against ``safetensors.safe_open``.

    Raises:
        ModelFormatError: missing file, truncated file, bad header length or JSON.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ModelFormatError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise ModelFormatError(f"{path}: bad safetensors header length {n} (file {size} bytes)")
            header = json.loads(fh.read(n))
    except FileNotFoundError as exc:
        raise ModelFormatError(f"{path}: no such file") from exc
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ModelFormatError(f"{path}: safetensors header is not valid JSON ({type(exc).__name__}: "
                               f"{str(exc)[:200]})") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: safetensors header is not a JSON object")
    return header, 8 + n, size


class SafetensorsDir:
    """A HF model directory opened as a source (see module docstring).

    Attributes:
        path: the directory. metadata: ``config.json`` as a dict. tensors: name -> TensorRef (offsets
        absolute within the tensor's shard). tokenizer_json: text of ``tokenizer.json`` or None.
        skipped: names of non-float tensors left out. files: the shard files.

    Raises (constructor):
        ModelFormatError: not a directory, no config.json / safetensors, a malformed header, a tensor
            whose byte range disagrees with its shape and dtype or runs past its file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ModelFormatError(f"{self.path}: not a model directory")
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise ModelFormatError(f"{self.path}: config.json is missing")
        self.metadata: dict[str, Any] = read_json_file(cfg)
        if not isinstance(self.metadata, dict):
            raise ModelFormatError(f"{cfg}: not a JSON object")
        tok = self.path / "tokenizer.json"
        self.tokenizer_json: str | None = _read_text(tok) if tok.is_file() else None
        self.files = self._shards()
        self.tensors: dict[str, TensorRef] = {}
        self.skipped: list[str] = []
        self._file_of: dict[str, int] = {}
        self._mm: dict[int, np.ndarray] = {}
        for k, f in enumerate(self.files):
            self._index(k, f)
        self.from_cache = False

    def _shards(self) -> list[Path]:
        single = self.path / "model.safetensors"
        if single.is_file():
            return [single]
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                wm = read_json_file(index)["weight_map"]
                names = sorted(set(wm.values()))
            except (KeyError, TypeError, AttributeError) as exc:
                raise ModelFormatError(f"{index}: malformed index ({type(exc).__name__}: {exc})") from None
            if not all(isinstance(n, str) and n and "/" not in n and n not in (".", "..") for n in names):
                raise ModelFormatError(f"{index}: weight_map values must be shard file names")
            return [self.path / n for n in names]
        raise ModelFormatError(f"{self.path}: no model.safetensors (or model.safetensors.index.json)")

    def _index(self, k: int, f: Path) -> None:
        header, start, size = read_safetensors_header(f)
        for name, d in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape, (b, e) = d["dtype"], tuple(d["shape"]), d["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise ModelFormatError(f"{f}: tensor {name}: malformed header entry (needs dtype, shape and "
                                       f"data_offsets [begin, end]; got a {type(d).__name__})") from None
            if not isinstance(dtype, str):
                raise ModelFormatError(f"{f}: tensor {name}: dtype must be a string, got a {type(dtype).__name__}")
            if not all(_is_uint(x) for x in (*shape, b, e)):
                raise ModelFormatError(f"{f}: tensor {name}: shape and data_offsets must be non-negative integers")
            if not 0 <= b <= e or start + e > size:
                raise ModelFormatError(f"{f}: tensor {name} (bytes {b}..{e}) runs past the end of the file "
                                       f"({size} bytes): truncated file?")
            if dtype not in ST_DTYPES:
                self.skipped.append(name)
                continue
            gt, width = ST_DTYPES[dtype]
            n = math.prod(shape)  # Python integers: no int64 wrap-around
            if n * width != e - b:
                raise ModelFormatError(f"{f}: tensor {name}: {e - b} bytes disagree with shape {shape} {dtype}")
            self.tensors[name] = TensorRef(name, gt, shape, start + b, e - b)
            self._file_of[name] = k

    def data(self, name: str) -> np.ndarray:
        """Raw little-endian bytes of tensor ``name`` (uint8, zero-copy view of the memory-mapped shard).

        Raises:
            ModelFormatError: if the tensor is absent.
        """
        t = self.tensors.get(name)
        if t is None:
            raise ModelFormatError(f"{self.path}: required tensor {name!r} is missing")
        k = self._file_of[name]
        if k not in self._mm:
            self._mm[k] = np.memmap(self.files[k], dtype=np.uint8, mode="r")
        return self._mm[k][t.offset:t.offset + t.nbytes]

    def has(self, name: str) -> bool:
        return name in self.tensors

    def read_json(self, relpath: str) -> dict[str, Any] | None:
        """A JSON side file of the directory (e.g. ``1_Pooling/config.json``), or None if absent/invalid."""
        p = self.path / relpath
        try:
            return read_json_file(p) if p.is_file() else None
        except ModelFormatError:
            return None


def _is_uint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _read_text(path: Path) -> str:
    """The UTF-8 text of ``path``. Raises ModelFormatError (naming the file) if unreadable or not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ModelFormatError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ModelFormatError(f"{path}: cannot be read ({exc.strerror})") from None


def read_json_file(path: Path) -> Any:
    """Parse a JSON side file (config.json, tokenizer.json, an index).

    Raises:
        ModelFormatError: unreadable, not UTF-8, not JSON, or nested too deeply for the parser
            (RecursionError); the message names the file.
    """
    try:
        return json.loads(_read_text(path))
    except (ValueError, RecursionError) as exc:
        raise ModelFormatError(f"{path}: not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
