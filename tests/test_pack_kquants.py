"""The load-time Numba packer of the K-quants and IQ4 types (apr_numba/quants/pack_kquants.py, via ``pack_raw``).

References: the NumPy decoders (``pack(decode_codes(...))``, themselves checked bit for bit against gguf-py in
tests/test_kquants.py and tests/test_quant_real.py) for the packed arrays q, s, m, which must be identical; and
``gguf.quants.dequantize`` (llama.cpp's gguf-py) for the weights the packed matrix holds. Blocks: random valid
blocks (tests/tiny_gguf.py) and the blocks llama.cpp's quantizer wrote in tests/fixtures/requant/quant_samples.gguf.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from apr_numba.quants.layouts import FAMILY_I8, FAMILY_U4, FAMILY_U5, decode_codes
from apr_numba.quants.repack import pack, pack_raw
from tests.test_quant_real import TENSORS
from tests.tiny_gguf import random_blocks

T = GGMLQuantizationType
K_TYPES = [T.Q4_K, T.Q5_K, T.Q6_K, T.Q2_K, T.Q3_K, T.IQ4_NL, T.IQ4_XS]
# one row; fewer rows than a 64-row group; several groups with a partial last one
SHAPES = [(1, 256), (70, 512), (130, 768)]
FAMILY = {T.Q4_K: FAMILY_U4, T.Q5_K: FAMILY_U5}  # the rest: FAMILY_I8


def layouts(qtype):
    return ("u5", "i8") if qtype == T.Q5_K else (None,)


def assert_same_packing(qtype, raw, rows, cols, q5):
    want = pack(decode_codes(int(qtype), raw, (rows, cols)), q5=q5)
    got = pack_raw(int(qtype), raw, (rows, cols), q5=q5)
    assert got is not None, qtype.name
    assert (got.family, got.ggml_type, got.rows, got.cols, got.group) == \
        (want.family, want.ggml_type, want.rows, want.cols, want.group)
    for a in ("q", "s", "m"):
        x, y = getattr(got, a), getattr(want, a)
        assert (x.shape, x.dtype) == (y.shape, y.dtype), (qtype.name, q5, a)
        # bit patterns, not values: -0.0 vs 0.0 or a rounding difference of the d*sc products must fail
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), (qtype.name, q5, a)
    ref = quants.dequantize(raw, qtype).reshape(rows, cols)
    assert np.array_equal(got.dequantize(), ref), (qtype.name, q5)
    return got


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_random_blocks_pack_like_the_numpy_path(qtype, shape):
    rows, cols = shape
    raw = random_blocks(qtype, rows, cols, np.random.default_rng(int(qtype) * 31 + rows))
    for q5 in layouts(qtype):
        got = assert_same_packing(qtype, raw, rows, cols, q5)
        want_family = FAMILY_I8 if q5 == "i8" else FAMILY.get(qtype, FAMILY_I8)
        assert got.family == want_family
        assert np.abs(got.s).max() > 0 and got.q.any()  # not an all-zero comparison


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_read_only_memory_map_and_flat_input(qtype, tmp_path):
    """What the loader passes: a flat read-only view of the file's bytes."""
    rows, cols = 65, 512
    raw = random_blocks(qtype, rows, cols, np.random.default_rng(5))
    path = tmp_path / "blocks.bin"
    raw.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    assert not mm.flags.writeable
    for q5 in layouts(qtype):
        assert_same_packing(qtype, mm, rows, cols, q5)


@pytest.mark.parametrize("name,ty,raw,rows,cols", TENSORS)
def test_real_llama_cpp_blocks_pack_like_the_numpy_path(name, ty, raw, rows, cols):
    assert int(ty) in {int(t) for t in K_TYPES}, f"{name}: {ty.name} is not a type this packer covers"
    for q5 in layouts(ty):
        assert_same_packing(ty, raw, rows, cols, q5)


def test_real_samples_cover_every_k_type():
    assert {int(p.values[1]) for p in TENSORS} == {int(t) for t in K_TYPES}


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.Q5_K, T.Q8_0, T.Q4_1, T.Q5_0], ids=lambda t: t.name)
def test_one_matrix_split_over_threads_packs_the_same(qtype, monkeypatch):
    """A matrix over SPLIT_BYTES is packed in chunks of row groups on threads: same arrays as one call (which
    the tests above compare with the NumPy path), with a partial last group."""
    from apr_numba.quants import repack

    rows, cols = 64 * 5 + 7, 512
    raw = random_blocks(qtype, rows, cols, np.random.default_rng(9))
    one = pack_raw(int(qtype), raw, (rows, cols))
    monkeypatch.setattr(repack, "SPLIT_BYTES", raw.nbytes // 4)  # -> min(threads, G, 5) = 3 chunks
    name = {T.Q8_0: "_pack_b32", T.Q4_1: "_pack_b32", T.Q5_0: "_pack_q5_u5"}.get(qtype, "pack_k_blocks")
    kernel, calls = getattr(repack, name), []

    def counted(raw2, *args):
        calls.append(raw2.shape[0])
        return kernel(raw2, *args)

    monkeypatch.setattr(repack, name, counted)
    split = pack_raw(int(qtype), raw, (rows, cols), threads=3)
    assert sorted(calls) == [64 + 7, 64 * 2, 64 * 2], calls  # rows of each chunk: 6 row groups in 3
    for a in ("q", "s", "m"):
        assert np.array_equal(getattr(split, a).view(np.uint8), getattr(one, a).view(np.uint8)), (qtype.name, a)
    assert np.array_equal(split.dequantize(), quants.dequantize(raw, qtype).reshape(rows, cols))
