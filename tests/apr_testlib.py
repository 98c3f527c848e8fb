"""Test helpers for the APR v2 tests, written from the facts page (shared/docs/aprender-facts.md) and
independent of apr_numba.formats.apr_format: byte layout with struct + zlib, aprender's AprQ4 / AprQ8
quantizers, and a tiny one-layer llama decoder (GGUF-style names and metadata) to build files from."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np

from tests.tiny_gguf import byte_alphabet

MAGIC = b"APR\x00"
ROW_MAJOR = 0x0400


def pad64(b: bytes) -> bytes:
    return b + bytes(-len(b) % 64)


def encode_entry(name, dtype: int, dims, offset: int, size: int, ndim: int | None = None) -> bytes:
    """One index entry: name_len u16, name, dtype u8, ndim u8, dims u64 x ndim, offset u64, size u64."""
    nb = name.encode("utf-8") if isinstance(name, str) else bytes(name)
    dims = list(dims)
    return (struct.pack("<H", len(nb)) + nb + struct.pack("<BB", dtype, len(dims) if ndim is None else ndim)
            + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<QQ", offset, size))


def header_bytes(*, count: int, metadata_size: int, index_offset: int, data_offset: int, flags: int = ROW_MAJOR,
                 version=(2, 0), magic: bytes = MAGIC, metadata_offset: int = 64, crc: int | None = None) -> bytes:
    """The 64-byte header at the offsets of the facts table, CRC32 over [0, 40) + [44, 64) unless given."""
    h = bytearray(64)
    h[0:4] = magic
    h[4], h[5] = version
    struct.pack_into("<H", h, 6, flags)
    struct.pack_into("<I", h, 8, count)
    struct.pack_into("<Q", h, 12, metadata_offset)
    struct.pack_into("<I", h, 20, metadata_size)
    struct.pack_into("<Q", h, 24, index_offset)
    struct.pack_into("<Q", h, 32, data_offset)
    struct.pack_into("<I", h, 40, zlib.crc32(bytes(h[0:40]) + bytes(h[44:64])) if crc is None else crc)
    return bytes(h)


def refresh_crcs(buf: bytes) -> bytes:
    """Recompute the header CRC32 and the footer CRC32 of a (possibly mutated) file image."""
    b = bytearray(buf)
    if len(b) >= 64:
        struct.pack_into("<I", b, 40, zlib.crc32(bytes(b[0:40]) + bytes(b[44:64])))
    if len(b) >= 68:
        struct.pack_into("<I", b, len(b) - 4, zlib.crc32(bytes(b[:-4])))
    return bytes(b)


def assemble(meta, tensors, *, flags: int = ROW_MAJOR, version=(2, 0), count: int | None = None,
             entries: list[bytes] | None = None, footer: bool = True) -> tuple[bytes, dict]:
    """A complete file image: tensors = [(name, dtype, dims, data bytes)] (kept in the given order,
    each padded to 64). ``entries`` replaces the encoded index (for malformed cases).
    Returns (bytes, positions: index_offset, data_offset, entry_pos list, tensor offsets)."""
    mjson = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    data, offs = b"", []
    for _, _, _, blob in tensors:
        offs.append(len(data))
        data += pad64(bytes(blob))
    if entries is None:
        entries = [encode_entry(n, dt, dims, o, len(blob)) for (n, dt, dims, blob), o in zip(tensors, offs,
                                                                                             strict=True)]
    index = b"".join(entries)
    ioff = 64 + len(pad64(mjson))
    doff = ioff + len(pad64(index))
    hdr = header_bytes(count=len(entries) if count is None else count, metadata_size=len(mjson),
                       index_offset=ioff, data_offset=doff, flags=flags, version=version)
    body = hdr + pad64(mjson) + pad64(index) + data
    if footer:
        body += struct.pack("<I", zlib.crc32(body))
    pos, p = [], ioff
    for e in entries:
        pos.append(p)
        p += len(e)
    return body, {"index_offset": ioff, "data_offset": doff, "entry_pos": pos, "offsets": offs,
                  "metadata_size": len(mjson)}


# -- aprender's quantizers (facts page), written independently of apr_numba ---------------------------
def quantize_apr_q4(x: np.ndarray) -> bytes:
    """AprQ4: blocks of 32 over the flattened tensor (last zero-padded): f16 scale = max_abs / 7, then 16
    bytes, element 2i in the low nibble and 2i+1 in the high nibble of byte i, q = round(x / scale) + 8."""
    flat = np.asarray(x, np.float32).reshape(-1)
    out = bytearray()
    for b in range(0, flat.size, 32):
        blk = np.zeros(32, np.float32)
        blk[:min(32, flat.size - b)] = flat[b:b + 32]
        scale = np.float16(np.abs(blk).max() / 7.0)
        inv = 1.0 / float(scale) if float(scale) else 0.0
        q = [min(15, max(0, int(round(float(v) * inv)) + 8)) for v in blk]
        out += scale.tobytes() + bytes(q[2 * i] | (q[2 * i + 1] << 4) for i in range(16))
    return bytes(out)


def dequantize_apr_q4(raw: bytes, n: int) -> np.ndarray:
    """Independent AprQ4 dequantization: (q - 8) * scale, element order 2i low / 2i+1 high."""
    out = []
    for b in range(0, len(raw), 18):
        scale = np.frombuffer(raw[b:b + 2], "<f2")[0].astype(np.float32)
        for byte in raw[b + 2:b + 18]:
            out.append(np.float32(np.float32((byte & 15) - 8) * scale))
            out.append(np.float32(np.float32((byte >> 4) - 8) * scale))
    return np.array(out[:n], np.float32)


def quantize_apr_q8(x: np.ndarray) -> bytes:
    """AprQ8: one f32 scale = max_abs / 127, then round(x / scale) as int8."""
    flat = np.asarray(x, np.float32).reshape(-1)
    scale = np.float32(np.abs(flat).max() / 127.0)
    q = np.clip(np.round(flat / scale), -127, 127).astype(np.int8)
    return scale.tobytes() + q.tobytes()


def dequantize_apr_q8(raw: bytes, n: int) -> np.ndarray:
    scale = np.frombuffer(raw[:4], "<f4")[0]
    return np.array([np.float32(np.float32(v) * scale) for v in np.frombuffer(raw[4:4 + n], np.int8)], np.float32)


# -- a tiny llama decoder -----------------------------------------------------------------------------
D, H, F, V = 64, 2, 128, 300


def tiny_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array (NumPy order) of a one-layer llama with D=64, 2 heads, F=128, V=300."""
    rng = np.random.default_rng(seed)
    shapes = {"token_embd.weight": (V, D), "output_norm.weight": (D,), "blk.0.attn_norm.weight": (D,),
              "blk.0.ffn_norm.weight": (D,), "blk.0.attn_q.weight": (D, D), "blk.0.attn_k.weight": (D, D),
              "blk.0.attn_v.weight": (D, D), "blk.0.attn_output.weight": (D, D),
              "blk.0.ffn_gate.weight": (F, D), "blk.0.ffn_up.weight": (F, D), "blk.0.ffn_down.weight": (D, F)}
    return {n: (rng.standard_normal(s) * (0.2 if len(s) == 2 else 1.0)).astype(np.float32)
            for n, s in shapes.items()}


def tiny_tokens() -> list[str]:
    toks = byte_alphabet() + ["to"]
    return toks + [f"<extra_{i}>" for i in range(V - len(toks))]


def tiny_apr_metadata() -> dict:
    """aprender-keyed metadata for the tiny model (custom keys flat at the top level)."""
    return {"model_type": "llama", "architecture": "llama", "name": "tiny", "hidden_size": D, "num_layers": 1,
            "num_heads": H, "num_kv_heads": H, "vocab_size": V, "intermediate_size": F,
            "max_position_embeddings": 64, "rope_theta": 10000.0, "rope_type": 0, "rms_norm_eps": 1e-5,
            "tokenizer.vocabulary": tiny_tokens(), "tokenizer.merges": ["t o"], "tokenizer.model": "gpt2",
            "tokenizer.pre_type": "smollm", "tokenizer.bos_token_id": 0, "tokenizer.eos_token_id": 1}


def write_tiny_gguf(path: Path, quant: dict[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """The tiny model as GGUF; ``quant`` maps tensor names to GGML types (quantized with gguf.quants)."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    w = GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(H)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tiny_tokens())
    w.add_token_types([3, 3] + [1] * (V - 2))
    w.add_token_merges(["t o"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    ts = tiny_tensors(seed)
    for name, arr in ts.items():
        qt = (quant or {}).get(name)
        if qt is None:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, quantize(arr, GGMLQuantizationType(qt)), raw_dtype=GGMLQuantizationType(qt))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ts
