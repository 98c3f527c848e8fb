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
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{path}: safetensors header is not valid JSON ({exc})") from exc
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
        try:
            self.metadata: dict[str, Any] = json.loads(cfg.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelFormatError(f"{cfg}: not valid JSON ({exc})") from exc
        tok = self.path / "tokenizer.json"
        self.tokenizer_json: str | None = tok.read_text(encoding="utf-8") if tok.is_file() else None
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
                wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ModelFormatError(f"{index}: malformed index ({exc})") from exc
            return [self.path / n for n in sorted(set(wm.values()))]
        raise ModelFormatError(f"{self.path}: no model.safetensors (or model.safetensors.index.json)")

    def _index(self, k: int, f: Path) -> None:
        header, start, size = read_safetensors_header(f)
        for name, d in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape, (b, e) = d["dtype"], tuple(int(x) for x in d["shape"]), d["data_offsets"]
            except (KeyError, TypeError, ValueError) as exc:
                raise ModelFormatError(f"{f}: tensor {name}: malformed header entry {d!r}") from exc
            if not 0 <= b <= e or start + e > size:
                raise ModelFormatError(f"{f}: tensor {name} (bytes {b}..{e}) runs past the end of the file "
                                       f"({size} bytes): truncated file?")
            if dtype not in ST_DTYPES:
                self.skipped.append(name)
                continue
            gt, width = ST_DTYPES[dtype]
            n = int(np.prod(shape, dtype=np.int64)) if shape else 1
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
            return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None
        except (ValueError, UnicodeDecodeError, OSError):
            return None
