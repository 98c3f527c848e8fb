"""``AprFile``: an APR v2 model file opened for inference, with the same interface as ``GGUFFile``.

The container is read and validated by :func:`apr_numba.formats.apr_format.read_apr` (header CRC, index,
extents, footer CRC). This class presents it the way the loader (:mod:`apr_numba.model.weights`) reads a
GGUF file:

* ``metadata``: GGUF key convention (``general.architecture``, ``{arch}.block_count``...,
  ``tokenizer.ggml.*``, ``tokenizer.chat_template``), converted from aprender's keys by
  :func:`apr_numba.formats.apr_meta.apr_to_gguf_metadata`;
* ``tensors``: GGUF tensor names (HF-style stored names mapped back, GGUF-style ones kept), NumPy
  order shapes (the stored [out, in] dims), absolute offsets;
* ``data(name)``: a zero-copy uint8 view of the memory-mapped tensor bytes.

Tensors in aprender's own AprQ4 / AprQ8 keep dtype 128 / 129 (decoded by
:func:`apr_numba.quants.layouts.decode_codes`), except ``token_embd.weight``, whose rows the
embedding kernel reads raw: an AprQ4 embedding is presented as GGML Q4_0 (same 18-byte blocks, its
nibbles reordered; exact) and an AprQ8 one as F32 (``scale * q`` in float32; exact), both copied.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apr_numba.errors import ModelFormatError
from apr_numba.formats import apr_format as af
from apr_numba.formats.apr_meta import apr_to_gguf_metadata, apr_to_gguf_name
from apr_numba.formats.mapped import PageReleaseMixin


@dataclass(frozen=True)
class AprTensorRef:
    """One tensor as the loader sees it: GGUF ``name``, dtype ``ggml_type`` (a GGML id, or 128 / 129
    for AprQ4 / AprQ8), NumPy-order ``shape``, absolute byte ``offset`` in the file, ``nbytes``;
    ``apr_name`` is the name stored in the file."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    apr_name: str = ""

    @property
    def type_name(self) -> str:
        return af.dtype_name(self.ggml_type)


class AprFile(PageReleaseMixin):
    """An APR v2 model file (see module docstring).

    Attributes:
        path, file_size: the file and its size in bytes.
        header: :class:`~apr_numba.formats.apr_format.AprHeader`. flags: header flag names.
        apr_metadata: the metadata JSON object as stored (aprender keys).
        metadata: GGUF-convention metadata derived from it.
        entries: the index entries (:class:`~apr_numba.formats.apr_format.TensorEntry`, stored names, index order).
        tensors: GGUF name -> :class:`AprTensorRef`.
        footer_crc, footer_crc_computed: stored and computed footer CRC32 (computed is None when
            ``verify_footer`` was false).
        from_cache: always False. tokenizer_json: always None (the tokenizer is built from ``metadata``).

    Args (constructor): ``path``; ``verify_footer`` (default True) checks the footer CRC32 over the whole
    file (about 0.25 s per 500 MB).

    Raises (constructor):
        ModelFormatError: anything :func:`~apr_numba.formats.apr_format.read_apr` rejects, a config or tokenizer
            value of the wrong JSON type, or two stored names that map to the same GGUF name.
    """

    def __init__(self, path: str | os.PathLike, verify_footer: bool = True):
        c = af.read_apr(path, verify_footer=verify_footer)
        self.path: Path = c.path
        self.file_size = c.file_size
        self.header = c.header
        self.flags = af.flag_names(c.header.flags)
        self.apr_metadata: dict[str, Any] = c.metadata
        self.metadata = apr_to_gguf_metadata(c.metadata, str(c.path))
        self.entries = c.entries
        self.footer_crc = c.footer_crc
        self.footer_crc_computed = c.footer_crc_computed
        self.from_cache = False
        self.tokenizer_json: str | None = None
        self._mm: np.ndarray | None = None
        self._converted: dict[str, np.ndarray] = {}
        self._embd_source: AprTensorRef | None = None
        self.tensors: dict[str, AprTensorRef] = {}
        for e in c.entries:
            gname = apr_to_gguf_name(e.name)
            if gname in self.tensors:
                raise ModelFormatError(f"{self.path}: tensors {self.tensors[gname].apr_name!r} and {e.name!r} "
                                       f"both map to {gname!r}")
            self.tensors[gname] = AprTensorRef(gname, e.kind, e.dims, c.absolute_offset(e), e.size, e.name)
        emb = self.tensors.get("token_embd.weight")
        if emb is not None and emb.ggml_type in (af.APR_Q4, af.APR_Q8) and len(emb.shape) == 2:
            q4_0 = emb.ggml_type == af.APR_Q4 and emb.shape[1] % 32 == 0
            kind, nbytes = (af.Q4_0, emb.nbytes) if q4_0 else (af.F32, 4 * emb.shape[0] * emb.shape[1])
            self._converted["token_embd.weight"] = np.empty(0, np.uint8)  # filled on first data()
            self.tensors["token_embd.weight"] = AprTensorRef(emb.name, kind, emb.shape, emb.offset, nbytes,
                                                             emb.apr_name)
            self._embd_source = emb

    # -- data --------------------------------------------------------------------------------
    def _raw(self, t: AprTensorRef) -> np.ndarray:
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mm[t.offset:t.offset + t.nbytes]

    def data(self, name: str) -> np.ndarray:
        """Raw bytes of tensor ``name`` (GGUF name) as a zero-copy uint8 view of the memory-mapped file
        (a converted copy for an AprQ4 / AprQ8 ``token_embd.weight``, see module docstring).

        Raises:
            ModelFormatError: if the tensor is absent.
        """
        t = self.tensors.get(name)
        if t is None:
            raise ModelFormatError(f"{self.path}: required tensor {name!r} is missing")
        if name in self._converted:
            if not self._converted[name].size and t.nbytes:
                self._converted[name] = _convert_embedding(self._embd_source, t.ggml_type,
                                                           self._raw(self._embd_source), str(self.path))
            return self._converted[name]
        return self._raw(t)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def describe(self) -> dict[str, Any]:
        """Header fields, flags, both checksums, metadata (large arrays summarized) and the index, for
        ``apr-numba inspect``. JSON-able."""
        h = self.header
        fcrc = self.footer_crc_computed
        if fcrc is None:
            fcrc = af.file_crc32(self.path, self.file_size - af.FOOTER_SIZE)
        tensors = [{"name": e.name, "dtype": e.dtype_name, "dtype_byte": e.dtype, "shape": list(e.dims),
                    "bytes": e.size, "offset": e.offset} for e in self.entries]
        return {
            "header": {"magic": af.MAGIC.decode("latin-1").rstrip("\x00"), "version": f"{h.version[0]}.{h.version[1]}",
                       "flags": h.flags, "flag_names": self.flags, "tensor_count": h.tensor_count,
                       "metadata_offset": h.metadata_offset, "metadata_size": h.metadata_size,
                       "tensor_index_offset": h.tensor_index_offset, "data_offset": h.data_offset},
            "checksums": {"header_crc32": f"0x{h.crc:08x}", "header_crc32_ok": True,
                          "footer_crc32": f"0x{self.footer_crc:08x}", "footer_crc32_computed": f"0x{fcrc:08x}",
                          "footer_crc32_ok": fcrc == self.footer_crc},
            "metadata": summarize_metadata(self.apr_metadata),
            "tensors": tensors,
            "totals": {"tensors": len(tensors), "tensor_bytes": sum(t["bytes"] for t in tensors),
                       "file_bytes": self.file_size},
        }


def summarize_metadata(meta: dict[str, Any], max_items: int = 8) -> dict[str, Any]:
    """``meta`` with every list longer than ``max_items`` (vocabulary, merges...) and every string over
    200 characters replaced by a short summary string (``"<list of 151936 items: ...>"``)."""
    out: dict[str, Any] = {}
    for k, v in meta.items():
        if isinstance(v, list) and len(v) > max_items:
            out[k] = f"<list of {len(v)} items: {', '.join(repr(x) for x in v[:3])}, ...>"
        elif isinstance(v, str) and len(v) > 200:
            out[k] = f"<string of {len(v)} characters: {v[:60]!r}...>"
        elif isinstance(v, dict):
            out[k] = summarize_metadata(v, max_items)
        else:
            out[k] = v
    return out


def _convert_embedding(src: AprTensorRef, kind: int, raw: np.ndarray, where: str) -> np.ndarray:
    """AprQ4 -> GGML Q4_0 bytes (nibbles reordered) or AprQ4 / AprQ8 -> F32 bytes, for the embedding."""
    from apr_numba.quants.layouts import decode_codes

    rows, cols = src.shape
    if kind == af.Q4_0:
        blocks = np.asarray(raw).reshape(-1, 18)
        qs = blocks[:, 2:]
        codes = np.stack([qs & 0x0F, qs >> 4], axis=-1).reshape(-1, 32)  # AprQ4: element 2i low, 2i+1 high
        out = np.empty_like(blocks)
        out[:, :2] = blocks[:, :2]
        out[:, 2:] = codes[:, :16] | (codes[:, 16:] << 4)  # Q4_0: element j low, j+16 high
        return out.reshape(-1)
    w = decode_codes(src.ggml_type, raw, (rows, cols), f"{where}: {src.apr_name}").dequantize()
    return np.ascontiguousarray(w, dtype="<f4").reshape(-1).view(np.uint8)
