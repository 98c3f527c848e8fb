"""A checked walk of a GGUF file: structural pre-check before ``gguf.GGUFReader``, and a fast reader.

``GGUFReader`` trusts the counts and lengths in the file: a string length past the end of the file is
silently truncated, and an array count of 2**40 makes it loop (and allocate) for minutes. This walk
goes over the header, every metadata key/value and every tensor info with ``struct`` over a read-only
``mmap`` and checks each count and length against the bytes that remain before using it, so a
malformed file fails in microseconds with a :class:`~apr_numba.errors.ModelFormatError` naming the
file and the field, and nothing larger than the file is ever allocated.

:func:`check_gguf` only walks (``GGUFFile`` runs it before ``GGUFReader``). :func:`read_gguf` also
returns the values and the tensor table, with the same Python values as ``GGUFReader``'s
``field.contents()`` (int, float, bool, str, lists), about 30 times faster on a 152k-token vocabulary;
the importer uses it.

Layout (gguf-py ``gguf/constants.py``, ggml ``docs/gguf.md``): ``"GGUF"``, u32 version (2 or 3), u64
tensor count, u64 key/value count; each KV: string key (u64 length + bytes), u32 value type, value
(scalar, string, or array = u32 item type + u64 count + items); each tensor info: string name, u32
n_dims (<= 8), u64 dims (ne), u32 GGML type, u64 offset from the data section, which starts at the
next multiple of ``general.alignment`` (default 32). Little- or big-endian (detected from the version).
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Any

import numpy as np

from apr_numba.errors import ModelFormatError
from apr_numba.formats.mapped import TensorRef

# GGUF value type -> struct format (STRING 8 and ARRAY 9 are variable).
_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_SIZE = {k: struct.calcsize(v) for k, v in _FMT.items()}
_NP = {0: "u1", 1: "i1", 2: "u2", 3: "i2", 4: "u4", 5: "i4", 6: "f4", 7: "?", 10: "u8", 11: "i8", 12: "f8"}
_STRING, _ARRAY = 8, 9
MAX_DIMS = 8
MAX_ARRAY_DEPTH = 8


class _Scan:
    def __init__(self, buf, path: str, endian: str, keep: bool):
        self.buf, self.path, self.pos, self.end, self.endian, self.keep = buf, path, 0, len(buf), endian, keep
        self.u32 = struct.Struct(endian + "I")
        self.u64 = struct.Struct(endian + "Q")

    def fail(self, what: str) -> ModelFormatError:
        return ModelFormatError(f"{self.path}: corrupt or truncated GGUF file: {what} (at byte {self.pos} of "
                                f"{self.end})")

    def take(self, n: int, what: str) -> int:
        if n > self.end - self.pos:
            raise self.fail(f"{what} needs {n} bytes, only {self.end - self.pos} remain")
        p = self.pos
        self.pos += n
        return p

    def read_u32(self, what: str) -> int:
        return self.u32.unpack_from(self.buf, self.take(4, what))[0]

    def read_u64(self, what: str) -> int:
        return self.u64.unpack_from(self.buf, self.take(8, what))[0]

    def string(self, what: str, keep: bool) -> str | None:
        n = self.read_u64(f"{what} length")
        p = self.take(n, f"{what} of {n} bytes")
        if not keep:
            return None
        try:
            return str(self.buf[p:p + n], "utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def skip_strings(self, count: int, what: str) -> None:
        """Step over ``count`` length-prefixed strings (a 151k-262k token vocabulary in ~0.05 s, against ~0.6 s
        through :meth:`string`); a length that runs past the end re-walks them one by one for the exact error."""
        buf, pos, end, u64 = self.buf, self.pos, self.end, self.u64.unpack_from
        for _ in range(count):
            if pos + 8 > end:
                break
            pos += 8 + u64(buf, pos)[0]
            if pos > end:
                break
        else:
            self.pos = pos
            return
        for _ in range(count):
            self.string(f"{what} item", False)

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _FMT:
            p = self.take(_SIZE[vtype], what)
            return struct.unpack_from(self.endian + _FMT[vtype], self.buf, p)[0] if self.keep else None
        if vtype == _STRING:
            return self.string(what, self.keep)
        if vtype != _ARRAY:
            raise self.fail(f"{what}: unknown value type {vtype}")
        if depth >= MAX_ARRAY_DEPTH:
            raise self.fail(f"{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
        itype = self.read_u32(f"{what} item type")
        count = self.read_u64(f"{what} item count")
        left = self.end - self.pos
        if itype in _FMT:
            p = self.take(count * _SIZE[itype], f"{what} ({count} items)")
            if not self.keep:
                return None
            return np.frombuffer(self.buf, np.dtype(self.endian + _NP[itype]), count, p).tolist()
        if itype == _STRING:
            if count * 8 > left:
                raise self.fail(f"{what}: {count} strings cannot fit in the {left} bytes left")
            if self.keep:
                return [self.string(f"{what} item", True) for _ in range(count)]
            self.skip_strings(count, what)
            return None
        if itype == _ARRAY:
            if count * 12 > left:
                raise self.fail(f"{what}: {count} arrays cannot fit in the {left} bytes left")
            out = [self.value(_ARRAY, what, depth + 1) for _ in range(count)]
            return out if self.keep else None
        raise self.fail(f"{what}: unknown array item type {itype}")


class _ScalarScan(_Scan):
    """A scan that keeps scalar and string values and skips arrays (their lengths are still checked)."""

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype != _ARRAY:
            return super().value(vtype, what, depth)
        self.keep = False
        try:
            return super().value(vtype, what, depth)
        finally:
            self.keep = True


def probe_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], list]:
    """The scalar metadata (arrays such as the vocabulary skipped, not parsed) and the tensor infos
    ``(name, ne, ggml_type, offset)`` of a GGUF file: what deciding to refuse a file needs, read in a fraction
    of a second even for a 262,144-token vocabulary (a full parse takes seconds).

    Raises:
        ModelFormatError: as :func:`check_gguf`.
    """
    meta, infos, _ = _walk(path, True, scan=_ScalarScan)
    return meta, infos


def _walk(path: str | os.PathLike, keep: bool, scan=_Scan) -> tuple[dict[str, Any], list, int]:
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size < 24:
        raise ModelFormatError(f"{path}: corrupt or truncated GGUF file: {size} bytes, shorter than the "
                               f"24-byte header")
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != b"GGUF":
            raise ModelFormatError(f"{path}: not a GGUF file (magic {bytes(mm[:4])!r})")
        (v_le,) = struct.unpack_from("<I", mm, 4)
        endian = "<" if v_le in (2, 3) else ">"
        (version,) = struct.unpack_from(endian + "I", mm, 4)
        if version not in (2, 3):
            raise ModelFormatError(f"{path}: unsupported GGUF version {v_le} (2 and 3 are read)")
        s = scan(memoryview(mm), path, endian, keep)
        meta: dict[str, Any] = {}
        infos = []
        try:
            s.pos = 8
            n_tensors = s.read_u64("tensor count")
            n_kv = s.read_u64("key/value count")
            if n_kv * 13 > s.end - s.pos:
                raise s.fail(f"{n_kv} key/value pairs cannot fit in the file")
            if n_tensors * 24 > s.end - s.pos:
                raise s.fail(f"{n_tensors} tensor infos cannot fit in the file")
            align = 32
            for i in range(n_kv):
                key = s.string(f"key {i}", True)
                vtype = s.read_u32(f"type of {key!r}")
                if key == "general.alignment":
                    if vtype != 4:  # llama.cpp: general.alignment must be a u32
                        raise ModelFormatError(f"{path}: general.alignment has GGUF type {vtype}, expected "
                                               f"UINT32 (4)")
                    s.keep, keep_was = True, s.keep
                    align = s.value(vtype, "value of 'general.alignment'")
                    s.keep = keep_was
                    if align <= 0 or align & (align - 1):
                        raise ModelFormatError(f"{path}: general.alignment {align} is not a power of two")
                    meta[key] = align
                    continue
                meta[key] = s.value(vtype, f"value of {key!r}")
            for i in range(n_tensors):
                name = s.string(f"tensor {i} name", True)
                n_dims = s.read_u32(f"tensor {name!r} n_dims")
                if n_dims > MAX_DIMS:
                    raise s.fail(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
                p = s.take(8 * n_dims + 4 + 8, f"tensor {name!r} dims, type and offset")
                ne = struct.unpack_from(f"{endian}{n_dims}Q", s.buf, p)
                gtype, off = struct.unpack_from(endian + "IQ", s.buf, p + 8 * n_dims)
                infos.append((name, ne, gtype, off))
            end = s.pos
        finally:
            s.buf.release()
    _check_extents(path, infos, end, align, size)
    return meta, infos, end


def _check_extents(path: str, infos: list, end: int, align: int, size: int) -> None:
    """Check each tensor's type, shape and data extent as llama.cpp does (``gguf_init_from_file_impl``
    and ``llama_model_loader``): a known GGML type, a row that is a whole number of blocks, an offset
    that is a multiple of ``general.alignment``, bytes inside the data section (no wrap-around: Python
    integers, before any unsigned arithmetic), no two tensors overlapping. (llama.cpp also insists that
    the tensors lie in table order without gaps; this reader accepts any non-overlapping order.)"""
    from gguf import GGML_QUANT_SIZES

    data_start = -(-end // align) * align
    data_size = size - data_start
    extents = []
    for name, ne, gtype, off in infos:
        if gtype not in GGML_QUANT_SIZES:
            raise ModelFormatError(f"{path}: tensor {name!r} has unknown GGML type {gtype}")
        bs, ts = GGML_QUANT_SIZES[gtype]
        if ne and ne[0] % bs:
            raise ModelFormatError(f"{path}: tensor {name!r}: row size {ne[0]} is not a multiple of block size {bs}")
        n = 1
        for d in ne:
            n *= d
        nbytes = n // bs * ts
        if off % align:
            raise ModelFormatError(f"{path}: tensor {name!r} has offset {off}, not a multiple of general.alignment "
                                   f"{align}")
        if off + nbytes > data_size:
            raise ModelFormatError(f"{path}: tensor {name!r} (offset {off}, {nbytes} bytes) runs past the end of "
                                   f"the data section ({max(data_size, 0)} bytes from byte {data_start}): "
                                   f"truncated or corrupt file")
        extents.append((off, nbytes, name))
    extents.sort()
    for (o1, n1, a), (o2, _n2, b) in zip(extents, extents[1:], strict=False):
        if o1 + n1 > o2:
            raise ModelFormatError(f"{path}: tensors {a!r} (bytes {o1}..{o1 + n1}) and {b!r} (from byte {o2}) "
                                   f"overlap in the data section")


def check_gguf(path: str | os.PathLike) -> None:
    """Walk the GGUF header, metadata and tensor infos, checking every count and length.

    Raises:
        ModelFormatError: bad magic or version, a count / length / type that cannot be right for a file
            of this size, a bad ``general.alignment``, or a tensor whose type, shape or data extent is
            wrong (unknown type, misaligned offset, outside the data section, overlapping another);
            the message names the file, the field and the byte position.
    """
    _walk(path, keep=False)


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metadata and tensor table of a GGUF file, every extent checked.

    Returns:
        (metadata: key -> Python value as ``GGUFReader`` ``contents()`` gives it,
         tensors: name -> :class:`apr_numba.formats.gguf_file.TensorRef` (NumPy-order shape, absolute offset)).

    Raises:
        ModelFormatError: as :func:`check_gguf`, plus a bad ``general.alignment``, an unknown GGML type,
            a row that is not a whole number of blocks, a tensor past the end of the file, or a
            duplicate tensor name.
    """
    from gguf import GGML_QUANT_SIZES

    meta, infos, end = _walk(path, keep=True)
    data_start = -(-end // meta.get("general.alignment", 32)) * meta.get("general.alignment", 32)
    tensors = {}
    for name, ne, gtype, off in infos:
        bs, ts = GGML_QUANT_SIZES[gtype]
        n = 1
        for d in ne:
            n *= d
        nbytes = n // bs * ts
        if name in tensors:
            raise ModelFormatError(f"{path}: duplicate tensor name {name!r}")
        tensors[name] = TensorRef(name, gtype, tuple(int(x) for x in reversed(ne)), data_start + off, nbytes)
    return meta, tensors
