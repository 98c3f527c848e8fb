"""Malformed copies of a GGUF file for bad-input tests: patch one tensor offset, or rewrite the metadata.

The layout is read with gguf-py's ``GGUFReader`` (an independent reader: the field offsets and parts it
reports), never with the code under test. Rewritten files keep the tensor infos and the data section
byte for byte (tensor offsets are relative to the data section, which is re-aligned after the new
metadata).
"""

from __future__ import annotations

import functools
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType

V = GGUFValueType


@functools.lru_cache(maxsize=4)
def layout(path: str) -> dict[str, Any]:
    """kv: key -> (start, end) byte range; offset_pos: tensor name -> position of its u64 offset;
    infos: (start, end) of the tensor-info section; data: start of the data section; align."""
    r = GGUFReader(path, "r")
    kv = {}
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue
        kv[key] = (f.offset, f.offset + sum(int(p.nbytes) for p in f.parts))
    offset_pos, starts, ends = {}, [], []
    for t in r.tensors:
        f = t.field
        end = f.offset + sum(int(p.nbytes) for p in f.parts)
        offset_pos[t.name] = end - 8
        starts.append(f.offset)
        ends.append(end)
    align = int(r.fields["general.alignment"].contents()) if "general.alignment" in r.fields else 32
    return {"kv": kv, "offset_pos": offset_pos, "infos": (min(starts), max(ends)), "data": int(r.data_offset),
            "align": align, "offsets": {t.name: int(t.data_offset) - int(r.data_offset) for t in r.tensors}}


def set_offset(src: Path, dst: Path, name: str, offset: int) -> Path:
    """Copy ``src`` to ``dst`` with tensor ``name``'s data offset (relative to the data section) replaced."""
    pos = layout(str(src))["offset_pos"][name]
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as fh:
        fh.seek(pos)
        fh.write(struct.pack("<Q", offset % (1 << 64)))
    return dst


def _string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


_SCALAR = {V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I", V.INT32: "i",
           V.FLOAT32: "f", V.BOOL: "?", V.UINT64: "Q", V.INT64: "q", V.FLOAT64: "d"}


def value_bytes(value: Any, vtype: GGUFValueType, sub: GGUFValueType | None = None) -> bytes:
    """GGUF encoding of one value (type id first): scalars, strings, arrays of ``sub``."""
    out = struct.pack("<I", int(vtype))
    if vtype == V.STRING:
        return out + _string(value)
    if vtype == V.ARRAY:
        out += struct.pack("<IQ", int(sub), len(value))
        if sub == V.STRING:
            return out + b"".join(_string(x) for x in value)
        return out + b"".join(struct.pack("<" + _SCALAR[sub], x) for x in value)
    return out + struct.pack("<" + _SCALAR[vtype], value)


def rewrite_kv(src: Path, dst: Path, changes: dict[str, tuple | None]) -> Path:
    """Copy ``src`` to ``dst`` with metadata ``key -> (value, type[, item type])`` set (appended when new)
    or removed (``None``); tensor infos and data are kept byte for byte."""
    lay = layout(str(src))
    raw = np.memmap(src, dtype=np.uint8, mode="r")
    kv_items = []
    for key, (a, b) in lay["kv"].items():
        if key in changes:
            if changes[key] is not None:
                kv_items.append(_string(key) + value_bytes(*changes[key]))
        else:
            kv_items.append(bytes(raw[a:b]))
    for key, ch in changes.items():
        if key not in lay["kv"] and ch is not None:
            kv_items.append(_string(key) + value_bytes(*ch))
    (n_tensors,) = struct.unpack_from("<Q", raw, 8)
    head = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kv_items)) + b"".join(kv_items)
    i0, i1 = lay["infos"]
    head += bytes(raw[i0:i1])
    align = lay["align"]
    head += bytes(-len(head) % align)
    with open(dst, "wb") as fh:
        fh.write(head)
        fh.write(memoryview(raw[lay["data"]:]))
    return dst
