"""APR v2 container (apr_numba/formats/apr_format.py, apr_file.py): a file laid out by hand from the facts page
reads correctly, the writer's bytes match that layout, Q8_0 / AprQ4 / AprQ8 readings, and every malformed
case gets its own ModelFormatError naming the file and the problem."""

from __future__ import annotations

import json
import struct
import tracemalloc
import zlib

import numpy as np
import pytest

from apr_numba.errors import ModelFormatError
from apr_numba.formats import apr_format as af
from apr_numba.formats.apr_file import AprFile
from apr_numba.quants.layouts import FAMILY_F32, FAMILY_I8, FAMILY_U4, decode_codes
from apr_numba.quants.repack import pack
from tests.apr_testlib import (
    ROW_MAJOR,
    assemble,
    dequantize_apr_q4,
    dequantize_apr_q8,
    encode_entry,
    header_bytes,
    pad64,
    quantize_apr_q4,
    quantize_apr_q8,
    refresh_crcs,
    tiny_apr_metadata,
    tiny_tensors,
)

RNG = np.random.default_rng(7)
F32_VEC = np.arange(4, dtype="<f4")
Q8_0_BLOCKS = (np.concatenate([np.frombuffer(np.float16(0.5).tobytes(), np.uint8),
                               np.arange(-16, 16, dtype=np.int8).view(np.uint8)] * 2)).tobytes()  # 2 x 34 B
F16_MAT = np.arange(6, dtype="<f2").reshape(3, 2)


def good_parts():
    meta = {"model_type": "llama", "architecture": "llama", "hidden_size": 4, af.Q8_0_MARKER_KEY: af.Q8_0_MARKER}
    tensors = [("a.weight", 0, [4], F32_VEC.tobytes()), ("b.weight", 8, [2, 32], Q8_0_BLOCKS),
               ("c.weight", 1, [3, 2], F16_MAT.tobytes())]
    return meta, tensors


def write(tmp_path, data: bytes, name: str = "m.apr"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def bad(tmp_path, data: bytes, *words: str) -> str:
    """Write ``data``, open it, expect a ModelFormatError naming the file and containing ``words``."""
    p = write(tmp_path, data)
    tracemalloc.start()
    try:
        with pytest.raises(ModelFormatError) as ei:
            AprFile(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (1 << 20) + 8 * len(data), peak  # nothing sized by a claimed count or length
    msg = str(ei.value)
    assert str(p) in msg, msg
    for w in words:
        assert w.lower() in msg.lower(), msg
    return msg


# ---------------------------------------------------------------------------------------------- good files
def test_hand_built_file_from_facts_page_reads_correctly(tmp_path):
    meta = json.dumps({"model_type": "llama", "name": "hand", "tokenizer.vocabulary": ["a", "b"]}).encode()
    blobs = [("model.norm.weight", 0, [4], F32_VEC.tobytes()), ("model.embed_tokens.weight", 1, [3, 2],
                                                                 F16_MAT.tobytes())]
    blobs.sort(key=lambda t: t[0].encode())
    # Layout written out here byte by byte: header 64, metadata padded to 64, index padded, data padded, footer.
    index = b"".join(encode_entry(n, dt, dims, 64 * i, len(b)) for i, (n, dt, dims, b) in enumerate(blobs))
    ioff = 64 + len(pad64(meta))
    doff = ioff + len(pad64(index))
    hdr = bytearray(64)
    struct.pack_into("<4sBBHIQIQQ", hdr, 0, b"APR\x00", 2, 0, 0x0400 | 0x0200, 2, 64, len(meta), ioff, doff)
    struct.pack_into("<I", hdr, 40, zlib.crc32(bytes(hdr[:40]) + bytes(hdr[44:])))
    body = bytes(hdr) + pad64(meta) + pad64(index) + b"".join(pad64(b) for _, _, _, b in blobs)
    p = write(tmp_path, body + struct.pack("<I", zlib.crc32(body)))

    f = AprFile(p)
    h = f.header
    assert (h.version, h.flags, h.tensor_count, h.metadata_offset, h.metadata_size) == ((2, 0), 0x0600, 2, 64,
                                                                                       len(meta))
    assert (h.tensor_index_offset, h.data_offset) == (ioff, doff)
    assert f.flags == ["HAS_VOCAB", "LAYOUT_ROW_MAJOR"]
    assert f.footer_crc == f.footer_crc_computed == zlib.crc32(body)
    assert f.apr_metadata["name"] == "hand"
    assert f.metadata["general.architecture"] == "llama" and f.metadata["tokenizer.ggml.tokens"] == ["a", "b"]
    # stored HF names are presented under GGUF names; bytes are zero-copy views of the map
    assert set(f.tensors) == {"output_norm.weight", "token_embd.weight"}
    t = f.tensors["token_embd.weight"]
    assert (t.apr_name, t.ggml_type, t.shape, t.type_name) == ("model.embed_tokens.weight", 1, (3, 2), "F16")
    assert t.offset == doff + [n for n, *_ in blobs].index("model.embed_tokens.weight") * 64
    d = f.data("token_embd.weight")
    assert d.tobytes() == F16_MAT.tobytes() and d.dtype == np.uint8
    assert np.shares_memory(d, f._mm) and not d.flags.writeable
    assert f.data("output_norm.weight").view("<f4").tolist() == [0, 1, 2, 3]


def test_writer_bytes_match_the_facts_layout(tmp_path):
    meta, tensors = good_parts()
    p = tmp_path / "w.apr"
    hdr = af.write_apr(p, meta, [(n, dt, dims, b) for n, dt, dims, b in reversed(tensors)],
                       flags=0, progress=None)
    raw = p.read_bytes()
    # independent reading: header fields at the facts offsets, CRCs, 64-byte alignment, sorted index
    magic, major, minor, flags, count, moff, msize, ioff, doff, crc = struct.unpack_from("<4sBBHIQIQQI", raw)
    assert (magic, major, minor, count, moff) == (b"APR\x00", 2, 0, 3, 64)
    assert flags == 0x0400 | 0x0020  # ROW_MAJOR + QUANTIZED (Q8_0 present), no vocabulary
    assert crc == zlib.crc32(raw[:40] + raw[44:64]) == hdr.crc
    assert raw[44:64] == bytes(20)
    assert ioff % 64 == 0 and doff % 64 == 0 and ioff >= 64 + msize
    assert struct.unpack_from("<I", raw, len(raw) - 4)[0] == zlib.crc32(raw[:-4])
    stored_meta = json.loads(raw[64:64 + msize])
    assert stored_meta == meta
    expect, _ = assemble(raw[64:64 + msize], tensors, flags=0x0420)
    assert raw == expect  # byte for byte the layout the test builds itself


def test_writer_sets_vocab_flag_and_marker(tmp_path):
    p = tmp_path / "v.apr"
    af.write_apr(p, {"tokenizer.vocabulary": ["x"]}, [("q", 8, [1, 32], Q8_0_BLOCKS[:34])])
    f = AprFile(p)
    assert set(f.flags) == {"QUANTIZED", "HAS_VOCAB", "LAYOUT_ROW_MAJOR"}
    assert f.apr_metadata[af.Q8_0_MARKER_KEY] == af.Q8_0_MARKER


@pytest.mark.parametrize("spec, words", [
    (("", 0, [1], b"\0" * 4), "1..256"), (("x" * 257, 0, [1], b"\0" * 4), "1..256"),
    (("x", 0, [1] * 9, b"\0" * 4), "ndim 9"), (("x", 77, [1], b"\0" * 4), "unknown dtype"),
    (("x", 0, [2], b"\0" * 4), "disagree"), (("x", 2, [1, 20], b"\0" * 18), "multiple"),
])
def test_writer_rejects_bad_tensors(tmp_path, spec, words):
    with pytest.raises(ModelFormatError, match=words):
        af.write_apr(tmp_path / "x.apr", {}, [spec])
    assert not list(tmp_path.iterdir())  # no file, no temporary left behind


def test_writer_rejects_duplicates_and_column_major(tmp_path):
    with pytest.raises(ModelFormatError, match="duplicate"):
        af.write_apr(tmp_path / "x.apr", {}, [("a", 0, [1], b"\0" * 4)] * 2)
    with pytest.raises(ModelFormatError, match="COLUMN_MAJOR"):
        af.write_apr(tmp_path / "x.apr", {}, [], flags=af.Flag.LAYOUT_COLUMN_MAJOR)


def test_empty_and_scalar_tensors(tmp_path):
    p = tmp_path / "e.apr"
    af.write_apr(p, {}, [("empty", 0, [0, 5], b""), ("scalar", 0, [], b"\0\0\x80?")])
    f = AprFile(p)
    assert f.data("empty").size == 0 and f.data("scalar").view("<f4")[0] == 1.0


# ---------------------------------------------------------------------------------------------- Q8_0 coding
def test_byte_8_with_q8_0_size_reads_as_ggml_q8_0(tmp_path):
    meta, tensors = good_parts()
    del meta[af.Q8_0_MARKER_KEY]  # unmarked (e.g. written by another tool): decided by the byte size
    f = AprFile(write(tmp_path, assemble(meta, tensors)[0]))
    t = f.tensors["b.weight"]
    assert (t.ggml_type, t.type_name) == (af.Q8_0, "Q8_0")
    w = decode_codes(t.ggml_type, f.data("b.weight"), t.shape).dequantize()
    assert np.array_equal(w, np.tile(np.arange(-16, 16, dtype=np.float32) * 0.5, (2, 1)))


def test_byte_8_with_apr_q4_size_reads_as_aprender_legacy_q4(tmp_path):
    x = RNG.standard_normal((2, 40)).astype(np.float32)  # 80 values: 3 blocks, the last padded
    raw = quantize_apr_q4(x)
    f = AprFile(write(tmp_path, assemble({}, [("w", 8, [2, 40], raw)])[0]))
    t = f.tensors["w"]
    assert t.ggml_type == af.APR_Q4 and f.entries[0].dtype == 8
    assert np.array_equal(decode_codes(t.ggml_type, f.data("w"), t.shape).dequantize().reshape(-1),
                          dequantize_apr_q4(raw, 80))


def test_byte_8_marked_as_q8_0_rejects_other_sizes(tmp_path):
    raw = quantize_apr_q4(np.ones(64, np.float32))
    data = assemble({af.Q8_0_MARKER_KEY: af.Q8_0_MARKER}, [("w", 8, [2, 32], raw)])[0]
    bad(tmp_path, data, "disagree", "Q8_0")


def test_byte_9_reads_as_aprender_legacy_q8(tmp_path):
    x = RNG.standard_normal((3, 32)).astype(np.float32)
    raw = quantize_apr_q8(x)
    f = AprFile(write(tmp_path, assemble({}, [("w", 9, [3, 32], raw)])[0]))
    t = f.tensors["w"]
    assert t.ggml_type == af.APR_Q8
    assert np.array_equal(decode_codes(t.ggml_type, f.data("w"), t.shape).dequantize().reshape(-1),
                          dequantize_apr_q8(raw, 96))


# ---------------------------------------------------------------------------------------------- AprQ4 / AprQ8
@pytest.mark.parametrize("shape", [(4, 64), (3, 32), (2, 40), (5, 7)])
def test_apr_q4_decoder_matches_independent_dequantization(shape):
    x = RNG.standard_normal(shape).astype(np.float32)
    raw = quantize_apr_q4(x)
    codes = decode_codes(af.APR_Q4, np.frombuffer(raw, np.uint8), shape, "t")
    expect = dequantize_apr_q4(raw, x.size).reshape(shape)
    assert codes.family == (FAMILY_U4 if shape[1] % 32 == 0 else FAMILY_F32)
    assert np.array_equal(codes.dequantize(), expect)
    assert np.array_equal(pack(codes).dequantize(), expect)
    assert np.abs(expect - x).max() <= np.abs(x).max() / 7 * 0.5 + 1e-2  # it is a quantization of x


@pytest.mark.parametrize("shape", [(4, 64), (2, 40)])
def test_apr_q8_decoder_matches_independent_dequantization(shape):
    x = RNG.standard_normal(shape).astype(np.float32)
    raw = quantize_apr_q8(x)
    codes = decode_codes(af.APR_Q8, np.frombuffer(raw, np.uint8), shape, "t")
    expect = dequantize_apr_q8(raw, x.size).reshape(shape)
    assert codes.family == (FAMILY_I8 if shape[1] % 32 == 0 else FAMILY_F32)
    assert np.array_equal(codes.dequantize(), expect)
    assert np.array_equal(pack(codes).dequantize(), expect)


def test_apr_q_decoders_check_byte_counts():
    with pytest.raises(ModelFormatError, match="APR_Q4"):
        decode_codes(af.APR_Q4, np.zeros(17, np.uint8), (1, 32), "t")
    with pytest.raises(ModelFormatError, match="APR_Q8"):
        decode_codes(af.APR_Q8, np.zeros(35, np.uint8), (1, 32), "t")


def _tiny_apr(tmp_path, name: str, store, drop: str | None = None, extra=None):
    """The tiny model as .apr with HF names and aprender metadata; store(name, arr) -> (dtype, bytes)."""
    from apr_numba.formats.apr_meta import gguf_to_apr_name

    specs = []
    for n, arr in tiny_tensors().items():
        if n == drop:
            continue
        dt, raw = store(n, arr)
        specs.append((gguf_to_apr_name(n), dt, list(arr.shape), raw))
    p = tmp_path / name
    af.write_apr(p, {**tiny_apr_metadata(), **(extra or {})}, specs)
    return p


@pytest.mark.parametrize("qtype", [af.APR_Q4, af.APR_Q8])
def test_model_with_apr_quantized_weights_runs(tmp_path, qtype):
    from apr_numba.model.decoder import load

    quant = quantize_apr_q4 if qtype == af.APR_Q4 else quantize_apr_q8
    deq = dequantize_apr_q4 if qtype == af.APR_Q4 else dequantize_apr_q8

    def q_store(n, arr):
        return (qtype, quant(arr)) if arr.ndim == 2 else (0, arr.tobytes())

    def f_store(n, arr):  # the same weights, dequantized independently, stored F32
        return 0, (deq(quant(arr), arr.size).reshape(arr.shape) if arr.ndim == 2 else arr).tobytes()

    mq = load(_tiny_apr(tmp_path, "q.apr", q_store), n_ctx=16, warmup=False)
    mf = load(_tiny_apr(tmp_path, "f.apr", f_store), n_ctx=16, warmup=False)
    emb = mq.source.tensors["token_embd.weight"]
    assert emb.type_name == ("Q4_0" if qtype == af.APR_Q4 else "F32")  # embedding presented to the kernel
    assert np.array_equal(decode_codes(emb.ggml_type, mq.source.data("token_embd.weight"), emb.shape).dequantize(),
                          np.frombuffer(mf.source.data("token_embd.weight"), "<f4").reshape(emb.shape))
    ids = [5, 77, 256, 3]
    np.testing.assert_allclose(mq.logits(ids), mf.logits(ids), rtol=1e-4, atol=1e-4)


def test_required_tensor_missing(tmp_path):
    from apr_numba.model.decoder import load

    p = _tiny_apr(tmp_path, "m.apr", lambda n, a: (0, a.tobytes()), drop="blk.0.ffn_up.weight")
    with pytest.raises(ModelFormatError) as ei:
        load(p, warmup=False)
    assert str(p) in str(ei.value) and "blk.0.ffn_up.weight" in str(ei.value) and "missing" in str(ei.value)


def test_two_names_mapping_to_one(tmp_path):
    data = assemble({}, [("model.embed_tokens.weight", 0, [1], b"\0" * 4), ("token_embd.weight", 0, [1],
                                                                            b"\0" * 4)])[0]
    bad(tmp_path, data, "both map")


# ---------------------------------------------------------------------------------------------- malformed
def good_bytes(**kw) -> tuple[bytes, dict]:
    meta, tensors = good_parts()
    return assemble(meta, tensors, **kw)


def test_good_bytes_are_good(tmp_path):
    f = AprFile(write(tmp_path, good_bytes()[0]))
    assert [e.name for e in f.entries] == ["a.weight", "b.weight", "c.weight"]


@pytest.mark.parametrize("n", [0, 1, 40, 63])
def test_file_shorter_than_header(tmp_path, n):
    bad(tmp_path, good_bytes()[0][:n], "shorter than the 64-byte", f"({n} bytes)")


def test_bad_magic(tmp_path):
    b = bytearray(good_bytes()[0])
    b[0:4] = b"GGUF"
    bad(tmp_path, refresh_crcs(bytes(b)), "bad magic")


@pytest.mark.parametrize("version", [(1, 0), (3, 0), (0, 2)])
def test_unsupported_version(tmp_path, version):
    bad(tmp_path, good_bytes(version=version)[0], f"unsupported APR version {version[0]}.{version[1]}")


def test_header_crc_mismatch(tmp_path):
    b = bytearray(good_bytes()[0])
    b[50] ^= 1  # a reserved byte: covered by the header CRC
    bad(tmp_path, bytes(b), "header CRC32 mismatch")


def test_footer_crc_mismatch(tmp_path):
    data, pos = good_bytes()
    b = bytearray(data)
    b[pos["data_offset"] + 1] ^= 0x40  # tensor data: only the footer covers it
    bad(tmp_path, bytes(b), "footer CRC32 mismatch")


def test_footer_crc_not_checked_when_disabled(tmp_path):
    data, pos = good_bytes()
    b = bytearray(data)
    b[pos["data_offset"] + 1] ^= 0x40
    f = AprFile(write(tmp_path, bytes(b)), verify_footer=False)
    assert f.footer_crc_computed is None
    assert f.describe()["checksums"]["footer_crc32_ok"] is False


@pytest.mark.parametrize("meta, words", [(b"{not json", "not valid JSON"), (b"[1, 2]", "not a JSON object (got list)"),
                                         (b'"s"', "not a JSON object"), (b"\xff\xfe{}", "not UTF-8"),
                                         (b"[" * 100000 + b"]" * 100000, "JSON")])
def test_metadata_not_json_or_not_object(tmp_path, meta, words):
    bad(tmp_path, assemble(meta, good_parts()[1])[0], words)


def test_metadata_over_16_mib(tmp_path):
    b = bytearray(good_bytes()[0])
    struct.pack_into("<I", b, 20, 16 * 1024 * 1024 + 1)
    bad(tmp_path, refresh_crcs(bytes(b)), "over the 16 MiB limit")


def test_metadata_runs_past_index_offset(tmp_path):
    data, pos = good_bytes()
    b = bytearray(data)
    struct.pack_into("<I", b, 20, pos["index_offset"])  # 64 + size > index offset
    bad(tmp_path, refresh_crcs(bytes(b)), "runs past the tensor index offset")


def test_metadata_offset_not_64(tmp_path):
    b = bytearray(good_bytes()[0])
    struct.pack_into("<Q", b, 12, 128)
    bad(tmp_path, refresh_crcs(bytes(b)), "metadata_offset is 128")


def test_index_offset_past_data_offset(tmp_path):
    data, pos = good_bytes()
    b = bytearray(data)
    struct.pack_into("<Q", b, 24, pos["data_offset"] + 64)
    bad(tmp_path, refresh_crcs(bytes(b)), "past the data offset")


def test_data_offset_past_end_of_file(tmp_path):
    data, _ = good_bytes()
    b = bytearray(data)
    struct.pack_into("<Q", b, 32, len(data) + 64)
    bad(tmp_path, refresh_crcs(bytes(b)), "past the end of the file")


def test_index_unsorted(tmp_path):
    meta, tensors = good_parts()
    bad(tmp_path, assemble(meta, [tensors[1], tensors[0], tensors[2]])[0], "not sorted", "'a.weight' after 'b.weight'")


def test_index_duplicate_name(tmp_path):
    meta, tensors = good_parts()
    bad(tmp_path, assemble(meta, [tensors[0], tensors[0]])[0], "duplicate tensor name")


def test_index_count_cannot_fit_before_data_offset(tmp_path):
    bad(tmp_path, good_bytes(count=2**32 - 1)[0], "cannot fit", "runs past the data offset")


def test_index_entry_runs_past_data_offset(tmp_path):
    # two entries of exactly 64 bytes fill the index region; a third claimed entry starts at the data offset
    tensors = [("a" * 36, 0, [1], b"\0" * 4), ("b" * 36, 0, [1], b"\0" * 4)]
    data, pos = assemble({}, tensors, count=3)
    assert pos["data_offset"] - pos["index_offset"] == 128
    bad(tmp_path, data, "entry 2", "runs past the data offset")


def test_index_entry_dims_run_past_data_offset(tmp_path):
    entry = encode_entry("a", 0, [], 0, 4, ndim=8)[:-16]  # claims 8 dims (80 bytes); 59 bytes of padding follow
    data, pos = assemble({}, [("a", 0, [1], b"\0" * 4)], entries=[entry])
    assert pos["data_offset"] - pos["index_offset"] == 64
    bad(tmp_path, data, "entry 0", "runs past the data offset")


def test_empty_name(tmp_path):
    bad(tmp_path, assemble({}, [("", 0, [1], b"\0" * 4)])[0], "empty name")


def test_name_over_256_bytes(tmp_path):
    bad(tmp_path, assemble({}, [("n" * 257, 0, [1], b"\0" * 4)])[0], "257 bytes exceeds the 256-byte limit")
    assert AprFile(write(tmp_path, assemble({}, [("n" * 256, 0, [1], b"\0" * 4)])[0], "ok.apr"))


def test_name_not_utf8(tmp_path):
    bad(tmp_path, assemble({}, [(b"w\xff\xfe", 0, [1], b"\0" * 4)])[0], "not UTF-8")


def test_ndim_over_8(tmp_path):
    bad(tmp_path, assemble({}, [("t", 0, [1] * 9, b"\0" * 4)])[0], "ndim 9", "limit of 8")


def test_dims_product_overflows(tmp_path):
    bad(tmp_path, assemble({}, [("t", 0, [2**32, 2**32, 2], b"\0" * 4)])[0], "overflows")


def test_dims_disagree_with_byte_size(tmp_path):
    bad(tmp_path, assemble({}, [("t", 0, [2, 3], b"\0" * 20)])[0], "20 bytes disagree", "F32", "24 bytes expected")


def test_block_row_not_multiple(tmp_path):
    bad(tmp_path, assemble({}, [("t", 2, [2, 48], b"\0" * 54)])[0], "not a multiple", "Q4_0")


@pytest.mark.parametrize("dtype", [4, 16, 15, 31, 127, 130, 255])
def test_unknown_dtype(tmp_path, dtype):
    bad(tmp_path, assemble({}, [("t", dtype, [1], b"\0" * 4)])[0], f"unknown dtype {dtype}")


def test_tensor_offset_past_end_of_file(tmp_path):
    entry = encode_entry("t", 0, [1], 2**40, 4)
    bad(tmp_path, assemble({}, [("t", 0, [1], b"\0" * 4)], entries=[entry])[0], "runs past the end")


def test_tensor_size_past_end_of_file(tmp_path):
    entry = encode_entry("t", 0, [1 << 20], 0, 4 << 20)
    bad(tmp_path, assemble({}, [("t", 0, [1], b"\0" * 4)], entries=[entry])[0], "runs past the end")


def test_offset_plus_size_overflowing_u64(tmp_path):
    entry = encode_entry("t", 0, [1 << 60], 2**64 - 8, 4 << 60)
    bad(tmp_path, assemble({}, [("t", 0, [1], b"\0" * 4)], entries=[entry])[0], "runs past the end")


def test_truncated_file(tmp_path):
    data, pos = good_bytes()
    bad(tmp_path, data[:pos["data_offset"] + 70], "runs past the end")  # cut inside the data


def test_overlapping_tensors(tmp_path):
    entries = [encode_entry("a", 0, [4], 0, 16), encode_entry("b", 0, [4], 8, 16)]
    bad(tmp_path, assemble({}, [("a", 0, [8], b"\0" * 32)], entries=entries)[0], "overlap")


def test_layout_column_major(tmp_path):
    bad(tmp_path, good_bytes(flags=ROW_MAJOR | 0x0800)[0], "LAYOUT_COLUMN_MAJOR")


@pytest.mark.parametrize("flag", [0x0001, 0x0002, 0x0004, 0x0010])
def test_compressed_encrypted_sharded_rejected(tmp_path, flag):
    bad(tmp_path, good_bytes(flags=ROW_MAJOR | flag)[0], "unsupported flags")


def test_no_room_for_footer(tmp_path):
    data = header_bytes(count=0, metadata_size=0, index_offset=64, data_offset=64)
    bad(tmp_path, data + b"\0\0", "no room for the 4-byte CRC32 footer")


def test_read_apr_missing_file(tmp_path):
    with pytest.raises(ModelFormatError, match="no such"):
        AprFile(tmp_path / "nope.apr")


@pytest.mark.parametrize("change, words", [
    ({"num_heads": "2"}, "'num_heads' ('llama.attention.head_count') must be an integer"),
    ({"hidden_size": 0}, "in [1, 2**31)"), ({"head_dim": -64}, "'head_dim'"), ({"num_layers": 2**31}, "num_layers"),
    ({"num_layers": True}, "num_layers"), ({"rope_theta": "1e4"}, "'rope_theta' ('llama.rope.freq_base') must be a"),
    ({"tokenizer.vocabulary": 5}, "'tokenizer.ggml.tokens' must be a list of strings"),
    ({"tokenizer.merges": ["a b", 3]}, "tokenizer.ggml.merges"),
    ({"tokenizer.token_type": "1"}, "list of integers"), ({"tokenizer.bos_token_id": 1.5}, "bos_token_id"),
    ({"special_tokens": {"pad_token_id": "x"}}, "padding_token_id"),
    ({"gguf.llama.attention.key_length": []}, "head_dim"),
])
def test_metadata_value_types_checked(tmp_path, change, words):
    data = assemble({**tiny_apr_metadata(), **change}, [("t", 0, [1], b"\0" * 4)])[0]
    bad(tmp_path, data, words)


def test_metadata_custom_object_and_aliases(tmp_path):
    meta = {k: v for k, v in tiny_apr_metadata().items() if not k.startswith("tokenizer.")}
    meta["custom"] = {"tokenizer.vocabulary": ["a"], "tokenizer.model": "bpe", "tokenizer.pre_type": "qwen2"}
    f = AprFile(write(tmp_path, assemble(meta, [("t", 0, [1], b"\0" * 4)])[0]))
    assert f.metadata["tokenizer.ggml.tokens"] == ["a"] and f.metadata["tokenizer.ggml.model"] == "gpt2"
    assert f.metadata["tokenizer.ggml.pre"] == "qwen2" and f.metadata["llama.block_count"] == 1
