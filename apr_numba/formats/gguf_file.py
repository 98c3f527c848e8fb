"""Open a GGUF model file: metadata, a validated tensor table and zero-copy (memory-mapped) tensor bytes.

Parsing uses ``gguf.GGUFReader``. It parses every metadata array into NumPy objects, which takes
seconds for a 152k-token vocabulary, so the result that start-up needs (metadata without the
tokenizer arrays, the tensor table, the built tokenizer) is cached in ``$APR_NUMBA_CACHE``
(default ``~/.cache/apr_numba``), keyed by the file's absolute path, size and mtime. A cache hit
memory-maps the file with ``np.memmap`` and never runs the reader.

Every tensor's extent is checked against the file size and its byte count against its shape and
type before any kernel can read it, so a truncated or corrupt file raises
:class:`~apr_numba.errors.ModelFormatError` naming the file and the tensor, never a segfault.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES

from apr_numba.errors import ModelFormatError
from apr_numba.formats.mapped import PageReleaseMixin, TensorRef

CACHE_VERSION = 3  # 3: tensor extents checked (alignment, data section, overlap) before caching
_BIG_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
             "tokenizer.ggml.scores")


def cache_dir() -> Path:
    """The start-up cache folder: ``$APR_NUMBA_CACHE`` or ``~/.cache/apr_numba``."""
    d = os.environ.get("APR_NUMBA_CACHE")
    return Path(d) if d else Path.home() / ".cache" / "apr_numba"


def _cache_key(path: Path) -> str:
    st = path.stat()
    ident = f"{CACHE_VERSION}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


class GGUFFile(PageReleaseMixin):
    """A GGUF model file opened for inference.

    Attributes:
        path: the file.
        metadata: GGUF key -> Python value. The large tokenizer arrays are present only when the file
            was parsed now (``from_cache`` False); use :attr:`tokenizer_json` on a cache hit.
        tensors: name -> :class:`TensorRef`, validated.
        tokenizer_json: the cached serialized tokenizer, or None.
        from_cache: whether the start-up cache was used.

    Raises (constructor):
        ModelFormatError: missing file, not GGUF, truncated, a tensor outside the file, a byte count
            that disagrees with its shape and type.
    """

    def __init__(self, path: str | os.PathLike, use_cache: bool = True):
        self.path = Path(path)
        from apr_numba.formats.paths import check_model_path

        check_model_path(self.path, want_dir=False)  # a FIFO or device is refused before it is opened
        self.file_size = self.path.stat().st_size
        self.tokenizer_json: str | None = None
        self.from_cache = False
        self._mm: np.ndarray | None = None
        cached = self._load_cache() if use_cache else None
        if cached is not None:
            self.metadata, self.tensors, self.tokenizer_json = cached
            self.from_cache = True
        else:
            self.metadata, self.tensors = self._parse()
        self._validate()

    # -- parsing -----------------------------------------------------------------------------
    def _parse(self) -> tuple[dict[str, Any], dict[str, TensorRef]]:
        with open(self.path, "rb") as fh:
            magic = fh.read(4)
        if magic != b"GGUF":
            raise ModelFormatError(f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        from gguf import GGUFReader

        from apr_numba.formats.gguf_header import check_gguf

        check_gguf(self.path)  # counts and lengths against the file size, before GGUFReader trusts them
        try:
            reader = GGUFReader(self.path, "r")
            meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
            tensors = {}
            for t in reader.tensors:
                tensors[t.name] = TensorRef(t.name, int(t.tensor_type), tuple(int(x) for x in reversed(t.shape)),
                                            int(t.data_offset), int(t.n_bytes))
        except ModelFormatError:
            raise
        except (ValueError, IndexError, KeyError, TypeError, OverflowError, MemoryError, OSError) as exc:
            raise ModelFormatError(f"{self.path}: corrupt or truncated GGUF file ({type(exc).__name__}: "
                                   f"{str(exc)[:200]})") from exc
        return meta, tensors

    def _validate(self) -> None:
        for t in self.tensors.values():
            if t.ggml_type in GGML_QUANT_SIZES:
                bs, ts = GGML_QUANT_SIZES[t.ggml_type]
                n = int(np.prod(t.shape, dtype=np.int64)) if t.shape else 1
                if t.shape and t.shape[-1] % bs:
                    raise ModelFormatError(f"{self.path}: tensor {t.name}: row size {t.shape[-1]} is not a "
                                           f"multiple of {t.type_name} block size {bs}")
                if n // bs * ts != t.nbytes:
                    raise ModelFormatError(f"{self.path}: tensor {t.name}: {t.nbytes} bytes disagree with "
                                           f"shape {t.shape} of type {t.type_name}")
            if t.offset < 0 or t.offset + t.nbytes > self.file_size:
                raise ModelFormatError(f"{self.path}: tensor {t.name} (offset {t.offset}, {t.nbytes} bytes) runs "
                                       f"past the end of the file ({self.file_size} bytes): truncated file?")

    # -- cache -------------------------------------------------------------------------------
    def _cache_path(self) -> Path:
        return cache_dir() / f"gguf-{_cache_key(self.path)}.json"

    def _load_cache(self):
        try:
            p = self._cache_path()
            if not p.is_file():
                return None
            d = json.loads(p.read_text())
            if not isinstance(d.get("metadata"), dict):
                return None
            tensors = {n: TensorRef(n, int(v[0]), tuple(int(x) for x in v[1]), int(v[2]), int(v[3]))
                       for n, v in d["tensors"].items()}
            return d["metadata"], tensors, d.get("tokenizer_json")
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
            return None  # unreadable or malformed cache: parse the file instead

    def save_cache(self, tokenizer_json: str | None) -> None:
        """Write the start-up cache (metadata without the big tokenizer arrays, tensors, tokenizer)."""
        meta = {k: _jsonable(v) for k, v in self.metadata.items() if k not in _BIG_KEYS}
        d = {"metadata": meta, "tokenizer_json": tokenizer_json,
             "tensors": {n: [t.ggml_type, list(t.shape), t.offset, t.nbytes] for n, t in self.tensors.items()}}
        try:
            p = self._cache_path()
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(d))
            os.replace(tmp, p)
        except OSError:
            pass  # the cache is an optimisation only

    # -- data --------------------------------------------------------------------------------
    def data(self, name: str) -> np.ndarray:
        """Raw bytes of tensor ``name`` as a zero-copy uint8 view of the memory-mapped file.

        Raises:
            ModelFormatError: if the tensor is absent.
        """
        t = self.tensors.get(name)
        if t is None:
            raise ModelFormatError(f"{self.path}: required tensor {name!r} is missing")
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mm[t.offset:t.offset + t.nbytes]

    def has(self, name: str) -> bool:
        return name in self.tensors
