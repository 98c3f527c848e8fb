"""APR v2 container (aprender's ``.apr``): constants, header, tensor index, writer and validating reader.

The layout is aprender's APR v2 (``shared/docs/aprender-facts.md``; described as implemented in
``docs/apr-format.md``), all little-endian::

    [header 64 B][JSON metadata, zero-padded to 64][tensor index, zero-padded to 64]
    [tensor data, each tensor zero-padded to 64][CRC32 footer, u32]

Header: magic ``b"APR\\0"``, version (u8 major = 2, u8 minor = 0), flags u16, tensor_count u32,
metadata_offset u64 (= 64), metadata_size u32 (exact JSON length), tensor_index_offset u64,
data_offset u64, header CRC32 u32 (over bytes [0, 40) then [44, 64)), 20 reserved zero bytes.
Index entry: ``name_len u16, name (UTF-8), dtype u8, ndim u8, dims u64 x ndim, offset u64 (from
data_offset), size u64 (bytes, unpadded)``, sorted by name bytewise. The footer is the IEEE CRC32
(``zlib.crc32``) of every byte before it.

dtype bytes are GGML type ids plus aprender's AprQ4 (128) and AprQ8 (129). Byte 8 is GGML Q8_0
(34-byte blocks of 32 values) in files this project writes, which mark it in the metadata
(``apr_numba.dtype_8 = "ggml_q8_0"``); aprender's reader takes bytes 8 and 9 as its legacy
AprQ4 / AprQ8, and this reader tells them apart by byte size (see :func:`resolve_dtype`).

The reader (:func:`read_apr`) never trusts a count or length before checking it against the bytes
that remain, so a malformed file raises :class:`~apr_numba.errors.ModelFormatError` naming the file
and the problem and never allocates more than the file holds.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import IntFlag
from pathlib import Path
from typing import Any

import numpy as np

from apr_numba.errors import AprError, ModelFormatError

MAGIC = b"APR\x00"
VERSION = (2, 0)
HEADER_SIZE = 64
ALIGN = 64
FOOTER_SIZE = 4
MAX_METADATA_BYTES = 16 << 20
MAX_NAME_BYTES = 256
MAX_NDIM = 8
# magic, major, minor, flags, tensor_count, metadata_offset, metadata_size, index_offset, data_offset, crc, reserved
_HEADER = struct.Struct("<4sBBHIQIQQI20s")
assert _HEADER.size == HEADER_SIZE
_MIN_ENTRY = 2 + 1 + 1 + 1 + 8 + 8  # name_len, 1-byte name, dtype, ndim, offset, size (ndim 0)
_U64 = 1 << 64
Q8_0_MARKER_KEY = "apr_numba.dtype_8"  # metadata key: dtype byte 8 means GGML Q8_0 blocks
Q8_0_MARKER = "ggml_q8_0"


class Flag(IntFlag):
    """Header flag bits (aprender ``AprV2Flags``)."""

    LZ4 = 0x0001
    ZSTD = 0x0002
    ENCRYPTED = 0x0004
    SIGNED = 0x0008
    SHARDED = 0x0010
    QUANTIZED = 0x0020
    HAS_FILTERBANK = 0x0040
    HAS_MODEL_CARD = 0x0080
    STREAMING = 0x0100
    HAS_VOCAB = 0x0200
    LAYOUT_ROW_MAJOR = 0x0400
    LAYOUT_COLUMN_MAJOR = 0x0800


# Flags whose data this reader cannot use (compressed, encrypted or split data): rejected.
UNSUPPORTED_FLAGS = Flag.LZ4 | Flag.ZSTD | Flag.ENCRYPTED | Flag.SHARDED


def flag_names(flags: int) -> list[str]:
    """Names of the set bits of ``flags`` (unknown bits as ``0x....``)."""
    names = [f.name for f in Flag if flags & f.value]
    rest = flags & ~sum(f.value for f in Flag)
    return names + ([f"0x{rest:04x}"] if rest else [])


# dtype bytes. Plain: GGML F32/F16/BF16 and GGML's integer and F64 ids (used for buffers such as
# BERT position_ids); block types: (values per block, bytes per block), ggml-common.h.
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, LEGACY_APR_Q8 = 0, 1, 2, 3, 6, 7, 8, 9
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS = 10, 11, 12, 13, 14, 20, 23
I8, I16, I32, I64, F64, BF16, APR_Q4, APR_Q8 = 24, 25, 26, 27, 28, 30, 128, 129
PLAIN_SIZES = {F32: 4, F16: 2, BF16: 2, I8: 1, I16: 2, I32: 4, I64: 8, F64: 8}
BLOCK_SIZES = {Q4_0: (32, 18), Q4_1: (32, 20), Q5_0: (32, 22), Q5_1: (32, 24), Q8_0: (32, 34),
               Q4_K: (256, 144), Q5_K: (256, 176), Q6_K: (256, 210), Q2_K: (256, 84), Q3_K: (256, 110),
               IQ4_NL: (32, 18), IQ4_XS: (256, 136)}
APR_Q4_BLOCK = (32, 18)  # f16 scale + 16 bytes of nibbles per 32 values (last block zero-padded)
DTYPE_NAMES = {F32: "F32", F16: "F16", BF16: "BF16", I8: "I8", I16: "I16", I32: "I32", I64: "I64", F64: "F64",
               Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0", Q5_1: "Q5_1", Q8_0: "Q8_0", Q4_K: "Q4_K", Q5_K: "Q5_K",
               Q6_K: "Q6_K", Q2_K: "Q2_K", Q3_K: "Q3_K", IQ4_NL: "IQ4_NL", IQ4_XS: "IQ4_XS", APR_Q4: "APR_Q4",
               APR_Q8: "APR_Q8"}
KNOWN_DTYPE_BYTES = frozenset(DTYPE_NAMES) | {LEGACY_APR_Q8}
QUANTIZED_DTYPES = frozenset(BLOCK_SIZES) | {APR_Q4, APR_Q8}


def dtype_name(kind: int) -> str:
    """Display name of a resolved dtype (``"Q8_0"``, ``"APR_Q4"``...), ``dtype<N>`` if unknown."""
    return DTYPE_NAMES.get(kind, f"dtype{kind}")


def align(n: int, a: int = ALIGN) -> int:
    """``n`` rounded up to a multiple of ``a``."""
    return -(-n // a) * a


def element_count(dims: Iterable[int]) -> int:
    """Product of ``dims`` (1 for a scalar); may exceed 2**64 (callers check)."""
    n = 1
    for d in dims:
        n *= int(d)
    return n


def tensor_nbytes(kind: int, dims: tuple[int, ...]) -> int:
    """Exact byte size of a tensor of resolved dtype ``kind`` and shape ``dims`` ([out, in] order).

    Raises:
        ValueError: unknown dtype, or a GGML block type whose row (last dim) is not a whole number of
            blocks.
    """
    n = element_count(dims)
    if kind in PLAIN_SIZES:
        return n * PLAIN_SIZES[kind]
    if kind in BLOCK_SIZES:
        bs, ts = BLOCK_SIZES[kind]
        row = dims[-1] if dims else 1
        if row % bs:
            raise ValueError(f"row size {row} is not a multiple of the {dtype_name(kind)} block size {bs}")
        return n // bs * ts
    if kind == APR_Q4:
        return -(-n // APR_Q4_BLOCK[0]) * APR_Q4_BLOCK[1]
    if kind == APR_Q8:
        return 4 + n
    raise ValueError(f"unknown dtype {kind}")


def resolve_dtype(dtype: int, dims: tuple[int, ...], size: int, q8_0_marked: bool) -> int:
    """The dtype a stored ``dtype`` byte means for a tensor of ``dims`` and ``size`` bytes.

    Byte 8 is GGML Q8_0 when ``size`` is the Q8_0 size; otherwise, unless the file marks byte 8 as
    Q8_0 (``q8_0_marked``), it is aprender's legacy AprQ4 when ``size`` is the AprQ4 size. Byte 9 is
    aprender's legacy AprQ8 (GGML Q8_1 is not read). The two readings of byte 8 never collide: a
    Q8_0 tensor of n values has 34 n / 32 bytes, an AprQ4 one 18 ceil(n / 32).

    Raises:
        ValueError: unknown dtype byte, or ``size`` fitting no reading of it (message says why).
    """
    if dtype not in KNOWN_DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype}")
    if dtype == LEGACY_APR_Q8:
        return APR_Q8
    if dtype == Q8_0 and not q8_0_marked:
        try:
            if tensor_nbytes(Q8_0, dims) == size:
                return Q8_0
        except ValueError:
            pass
        if tensor_nbytes(APR_Q4, dims) == size:
            return APR_Q4
    return dtype


@dataclass(frozen=True)
class AprHeader:
    """The 64-byte header. Offsets are absolute byte positions; ``crc`` is the stored header CRC32."""

    version: tuple[int, int]
    flags: int
    tensor_count: int
    metadata_offset: int
    metadata_size: int
    tensor_index_offset: int
    data_offset: int
    crc: int = 0
    reserved: bytes = bytes(20)

    def pack(self) -> bytes:
        """The 64 header bytes with the CRC32 computed over [0, 40) + [44, 64) (``crc`` ignored)."""
        raw = _HEADER.pack(MAGIC, self.version[0], self.version[1], self.flags, self.tensor_count,
                           self.metadata_offset, self.metadata_size, self.tensor_index_offset, self.data_offset,
                           0, self.reserved)
        return raw[:40] + struct.pack("<I", header_crc(raw)) + raw[44:]


def header_crc(raw: bytes) -> int:
    """CRC32 of a 64-byte header: bytes [0, 40) followed by [44, 64)."""
    return zlib.crc32(raw[44:64], zlib.crc32(raw[0:40]))


def unpack_header(raw: bytes) -> AprHeader:
    """Parse 64 header bytes (no validation beyond the length)."""
    (_magic, major, minor, flags, count, moff, msize, ioff, doff, crc, reserved) = _HEADER.unpack(raw[:HEADER_SIZE])
    return AprHeader((major, minor), flags, count, moff, msize, ioff, doff, crc, reserved)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor index entry: stored name, dtype byte, dims ([out, in] order), offset from the data
    section, unpadded byte size; ``kind`` is the resolved dtype (see :func:`resolve_dtype`)."""

    name: str
    dtype: int
    dims: tuple[int, ...]
    offset: int
    size: int
    kind: int = -1

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.kind if self.kind >= 0 else self.dtype)


def encode_index(entries: Iterable[TensorEntry]) -> bytes:
    """Serialize index entries in the given order (callers sort them)."""
    out = bytearray()
    for e in entries:
        nb = e.name.encode("utf-8")
        out += struct.pack("<H", len(nb)) + nb + struct.pack("<BB", e.dtype, len(e.dims))
        out += struct.pack(f"<{len(e.dims)}Q", *e.dims) + struct.pack("<QQ", e.offset, e.size)
    return bytes(out)


def decode_index(buf: bytes, count: int, where: str) -> list[TensorEntry]:
    """Parse ``count`` index entries from ``buf`` (the bytes between the index and data offsets).

    Checks every length against the bytes left, name length (1..256 bytes, UTF-8), ndim (<= 8) and
    the strict bytewise name order. dtype and sizes are checked by :func:`read_apr`.

    Raises:
        ModelFormatError: the first problem, prefixed with ``where`` (the file).
    """
    if count * _MIN_ENTRY > len(buf):
        raise ModelFormatError(f"{where}: tensor index of {count} entries cannot fit in the {len(buf)} bytes "
                               f"before the data offset (index runs past the data offset)")
    entries: list[TensorEntry] = []
    pos, prev = 0, b""
    end = len(buf)

    def need(n: int, i: int, what: str) -> None:
        if pos + n > end:
            raise ModelFormatError(f"{where}: tensor index entry {i} ({what}) runs past the data offset")

    for i in range(count):
        need(2, i, "name length")
        (nlen,) = struct.unpack_from("<H", buf, pos)
        pos += 2
        if nlen == 0:
            raise ModelFormatError(f"{where}: tensor index entry {i} has an empty name")
        if nlen > MAX_NAME_BYTES:
            raise ModelFormatError(f"{where}: tensor index entry {i}: name of {nlen} bytes exceeds the "
                                   f"{MAX_NAME_BYTES}-byte limit")
        need(nlen + 2, i, "name")
        raw_name = bytes(buf[pos:pos + nlen])
        pos += nlen
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelFormatError(f"{where}: tensor index entry {i}: name {raw_name!r} is not UTF-8") from None
        dtype, ndim = buf[pos], buf[pos + 1]
        pos += 2
        if ndim > MAX_NDIM:
            raise ModelFormatError(f"{where}: tensor {name!r} has ndim {ndim}, over the limit of {MAX_NDIM}")
        need(8 * ndim + 16, i, "dims, offset, size")
        dims = struct.unpack_from(f"<{ndim}Q", buf, pos)
        offset, size = struct.unpack_from("<QQ", buf, pos + 8 * ndim)
        pos += 8 * ndim + 16
        if raw_name <= prev:
            what = "duplicate tensor name" if raw_name == prev else "tensor index is not sorted by name"
            raise ModelFormatError(f"{where}: {what}: {name!r} after {prev.decode('utf-8')!r}")
        prev = raw_name
        entries.append(TensorEntry(name, dtype, tuple(dims), offset, size))
    return entries


@dataclass
class AprContents:
    """What :func:`read_apr` found: header, metadata (the JSON object as stored), entries (resolved
    ``kind`` set, index order), file size, and the footer CRC32 stored / computed (None if not
    verified)."""

    path: Path
    file_size: int
    header: AprHeader
    metadata: dict[str, Any]
    entries: list[TensorEntry]
    footer_crc: int
    footer_crc_computed: int | None

    def absolute_offset(self, e: TensorEntry) -> int:
        return self.header.data_offset + e.offset


def file_crc32(path: str | os.PathLike, end: int, chunk: int = 1 << 26) -> int:
    """IEEE CRC32 of bytes [0, end) of the file, read through a memory map in ``chunk``-byte pieces."""
    if end <= 0:
        return 0
    mm = np.memmap(path, dtype=np.uint8, mode="r", shape=(end,))
    crc = 0
    for o in range(0, end, chunk):
        crc = zlib.crc32(mm[o:o + chunk], crc)
    del mm
    return crc


def _fail(path: Path, msg: str) -> ModelFormatError:
    return ModelFormatError(f"{path}: {msg}")


def read_apr(path: str | os.PathLike, verify_footer: bool = True) -> AprContents:
    """Read and validate an APR v2 file's header, metadata and tensor index (tensor data stays on disk).

    Checks, in order: header length, magic, version 2.x, header CRC32, flags (LAYOUT_COLUMN_MAJOR and
    LZ4/ZSTD/ENCRYPTED/SHARDED rejected), section offsets (metadata at 64, at most 16 MiB, before the
    index, the index before the data, the data before the footer), metadata UTF-8 JSON object, index
    entries (see :func:`decode_index`), each tensor's dtype, dims product (no u64 overflow) against its
    byte size, its extent inside the data section, no two tensors overlapping, and the footer CRC32.

    Raises:
        ModelFormatError: the first problem found, message ``"<path>: <what is wrong>"``.
    """
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "no such .apr file")
    size = path.stat().st_size
    if size < HEADER_SIZE:
        raise _fail(path, f"file is shorter than the {HEADER_SIZE}-byte APR header ({size} bytes)")
    with open(path, "rb") as fh:
        raw = fh.read(HEADER_SIZE)
        if raw[:4] != MAGIC:
            raise _fail(path, f"bad magic {raw[:4]!r}, expected {MAGIC!r}: not an APR file")
        h = unpack_header(raw)
        if h.version[0] != VERSION[0]:
            raise _fail(path, f"unsupported APR version {h.version[0]}.{h.version[1]} (this reader reads 2.x)")
        crc = header_crc(raw)
        if crc != h.crc:
            raise _fail(path, f"header CRC32 mismatch (stored 0x{h.crc:08x}, computed 0x{crc:08x})")
        if h.flags & Flag.LAYOUT_COLUMN_MAJOR:
            raise _fail(path, "flag LAYOUT_COLUMN_MAJOR is set: column-major tensors are not supported")
        if h.flags & UNSUPPORTED_FLAGS:
            names = flag_names(h.flags & UNSUPPORTED_FLAGS)
            raise _fail(path, f"unsupported flags {'|'.join(names)} (compressed, encrypted or sharded data)")
        data_end = size - FOOTER_SIZE
        if data_end < HEADER_SIZE:
            raise _fail(path, f"file of {size} bytes has no room for the 4-byte CRC32 footer")
        if h.metadata_offset != HEADER_SIZE:
            raise _fail(path, f"metadata_offset is {h.metadata_offset}, expected {HEADER_SIZE}")
        if h.metadata_size > MAX_METADATA_BYTES:
            raise _fail(path, f"metadata is {h.metadata_size} bytes, over the 16 MiB limit")
        if h.metadata_offset + h.metadata_size > h.tensor_index_offset:
            raise _fail(path, f"metadata ({h.metadata_size} bytes at {h.metadata_offset}) runs past the tensor "
                              f"index offset {h.tensor_index_offset}")
        if h.tensor_index_offset > h.data_offset:
            raise _fail(path, f"tensor index offset {h.tensor_index_offset} is past the data offset {h.data_offset}")
        if h.data_offset > data_end:
            raise _fail(path, f"data offset {h.data_offset} is past the end of the file ({size} bytes, "
                              f"footer included): truncated file?")
        fh.seek(h.metadata_offset)
        mraw = fh.read(h.metadata_size)
        fh.seek(h.tensor_index_offset)
        iraw = fh.read(h.data_offset - h.tensor_index_offset)
        fh.seek(data_end)
        (footer,) = struct.unpack("<I", fh.read(FOOTER_SIZE))
    try:
        meta = json.loads(mraw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise _fail(path, f"metadata is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise _fail(path, "metadata JSON is nested too deeply") from None
    except ValueError as exc:
        raise _fail(path, f"metadata is not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(meta, dict):
        raise _fail(path, f"metadata is not a JSON object (got {type(meta).__name__})")
    marked = _q8_0_marked(meta)
    entries = []
    data_size = data_end - h.data_offset
    for e in decode_index(iraw, h.tensor_count, str(path)):
        n = element_count(e.dims)
        if n >= _U64:
            raise _fail(path, f"tensor {e.name!r}: dims {list(e.dims)} product overflows 64 bits")
        try:
            kind = resolve_dtype(e.dtype, e.dims, e.size, marked)
            expect = tensor_nbytes(kind, e.dims)
        except ValueError as exc:
            raise _fail(path, f"tensor {e.name!r}: {exc}") from None
        if expect != e.size:
            raise _fail(path, f"tensor {e.name!r}: {e.size} bytes disagree with dims {list(e.dims)} of dtype "
                              f"{dtype_name(kind)} ({expect} bytes expected)")
        if e.offset + e.size > data_size:
            raise _fail(path, f"tensor {e.name!r} (offset {e.offset}, {e.size} bytes) runs past the end of the "
                              f"data section ({data_size} bytes before the footer): truncated file?")
        entries.append(TensorEntry(e.name, e.dtype, e.dims, e.offset, e.size, kind))
    by_offset = sorted((e for e in entries if e.size), key=lambda e: e.offset)
    for a, b in zip(by_offset, by_offset[1:], strict=False):
        if a.offset + a.size > b.offset:
            raise _fail(path, f"tensors {a.name!r} (offset {a.offset}, {a.size} bytes) and {b.name!r} "
                              f"(offset {b.offset}) overlap")
    computed = None
    if verify_footer:
        computed = file_crc32(path, data_end)
        if computed != footer:
            raise _fail(path, f"footer CRC32 mismatch (stored 0x{footer:08x}, computed 0x{computed:08x}): "
                              f"the file is corrupt")
    return AprContents(path, size, h, meta, entries, footer, computed)


def _q8_0_marked(meta: Mapping[str, Any]) -> bool:
    custom = meta.get("custom")
    return meta.get(Q8_0_MARKER_KEY) == Q8_0_MARKER or (
        isinstance(custom, dict) and custom.get(Q8_0_MARKER_KEY) == Q8_0_MARKER)


def _as_bytes(data: Any) -> memoryview:
    if isinstance(data, np.ndarray):
        return memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    return memoryview(data).cast("B")


TensorSpec = tuple[str, int, tuple[int, ...], Any]  # (name, dtype byte, dims [out, in], bytes-like)


def write_apr(path: str | os.PathLike, metadata: Mapping[str, Any], tensors: Iterable[TensorSpec], flags: int = 0,
              progress: Callable[[int], None] | None = None) -> AprHeader:
    """Write an APR v2 file (written to a temporary file beside ``path``, then renamed into place).

    Args:
        path: output file.
        metadata: the JSON metadata object (aprender key names; custom keys flat at the top level).
            ``apr_numba.dtype_8 = "ggml_q8_0"`` is added when a tensor has dtype byte 8.
        tensors: ``(name, dtype byte, dims, data)``; dims in [out, in] order (GGUF ne reversed), data
            any bytes-like or NumPy array holding exactly the tensor's bytes (a memory-mapped view is
            copied in 64 MiB pieces, never loaded whole). Sorted by name here.
        flags: extra flag bits; LAYOUT_ROW_MAJOR is always set, QUANTIZED when a tensor is quantized,
            HAS_VOCAB when the metadata has ``tokenizer.vocabulary``.
        progress: called with the byte count of each tensor written.

    Returns:
        The header written.

    Raises:
        ModelFormatError: a name empty, over 256 bytes or repeated; ndim over 8; an unknown dtype; a byte
            count that disagrees with dims and dtype; metadata not JSON-serializable or over 16 MiB;
            LAYOUT_COLUMN_MAJOR requested.
    """
    path = Path(path)
    specs = sorted(((n, int(dt), tuple(int(d) for d in dims), _as_bytes(data)) for n, dt, dims, data in tensors),
                   key=lambda s: s[0].encode("utf-8"))
    meta = dict(metadata)
    flags = (int(flags) | Flag.LAYOUT_ROW_MAJOR) & 0xFFFF
    if flags & Flag.LAYOUT_COLUMN_MAJOR:
        raise ModelFormatError(f"{path}: LAYOUT_COLUMN_MAJOR cannot be written")
    if any(dt == Q8_0 for _, dt, _, _ in specs):
        meta[Q8_0_MARKER_KEY] = Q8_0_MARKER
    if any(dt in QUANTIZED_DTYPES for _, dt, _, _ in specs):
        flags |= Flag.QUANTIZED
    if meta.get("tokenizer.vocabulary"):
        flags |= Flag.HAS_VOCAB
    entries, offset, prev = [], 0, None
    for name, dt, dims, mv in specs:
        nb = name.encode("utf-8")
        if not nb or len(nb) > MAX_NAME_BYTES:
            raise ModelFormatError(f"{path}: tensor name {name!r} must be 1..{MAX_NAME_BYTES} UTF-8 bytes")
        if nb == prev:
            raise ModelFormatError(f"{path}: duplicate tensor name {name!r}")
        prev = nb
        if len(dims) > MAX_NDIM:
            raise ModelFormatError(f"{path}: tensor {name!r} has ndim {len(dims)}, over the limit of {MAX_NDIM}")
        try:
            if dt not in DTYPE_NAMES:
                raise ValueError(f"unknown dtype {dt}")
            expect = tensor_nbytes(dt, dims)
        except ValueError as exc:
            raise ModelFormatError(f"{path}: tensor {name!r}: {exc}") from None
        if expect != mv.nbytes:
            raise ModelFormatError(f"{path}: tensor {name!r}: {mv.nbytes} bytes disagree with dims {list(dims)} "
                                   f"of dtype {dtype_name(dt)} ({expect} expected)")
        entries.append(TensorEntry(name, dt, dims, offset, mv.nbytes, dt))
        offset = align(offset + mv.nbytes)
    try:
        mjson = json.dumps(meta, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ModelFormatError(f"{path}: metadata cannot be stored as JSON ({exc})") from None
    if len(mjson) > MAX_METADATA_BYTES:
        raise ModelFormatError(f"{path}: metadata is {len(mjson)} bytes, over the 16 MiB limit")
    index = encode_index(entries)
    ioff = align(HEADER_SIZE + len(mjson))
    doff = align(ioff + len(index))
    header = AprHeader(VERSION, flags, len(entries), HEADER_SIZE, len(mjson), ioff, doff)
    hraw = header.pack()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    crc = 0
    try:
        with open(tmp, "wb") as fh:
            def put(b) -> None:
                nonlocal crc
                fh.write(b)
                crc = zlib.crc32(b, crc)

            put(hraw)
            put(mjson + bytes(ioff - HEADER_SIZE - len(mjson)))
            put(index + bytes(doff - ioff - len(index)))
            for (_, _, _, mv), e in zip(specs, entries, strict=True):
                for o in range(0, mv.nbytes, 1 << 26):
                    put(mv[o:o + (1 << 26)])
                put(bytes(align(e.size) - e.size))
                if progress is not None:
                    progress(e.size)
            fh.write(struct.pack("<I", crc))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise AprError(f"{path}: cannot write the .apr file: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return unpack_header(hraw)
