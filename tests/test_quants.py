"""Quant decoding, packing and the matmul / embedding kernels against gguf-py's NumPy dequantizers.

Independent reference: ``gguf.quants.dequantize`` (llama.cpp's gguf-py), on random blocks and on real
tensors of both models; products are checked against float64 ``X @ W.T`` of those dequantized weights.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from apr_numba.errors import ModelFormatError
from apr_numba.kernels.embed import dequant_row
from apr_numba.kernels.matmul import matmul_packed
from apr_numba.quants.layouts import FAMILY_I8, FAMILY_U5, SUPPORTED_TYPES, decode_codes
from apr_numba.quants.repack import pack, pack_raw, q5_layout
from tests.tiny_gguf import random_blocks

T = GGMLQuantizationType
QUANT_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q6_K]
FLOAT_TYPES = [T.F32, T.F16, T.BF16]
# (type, Q5 layout): every type with the default packing (Q5_0 / Q5_1 -> FAMILY_U5), plus Q5 packed as FAMILY_I8
Q5_I8 = [(T.Q5_0, "i8"), (T.Q5_1, "i8")]


def case_id(case) -> str:
    qtype, q5 = case
    return qtype.name + ("-i8" if q5 == "i8" else "")


def random_tensor(qtype, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Raw bytes (rows, row_bytes) uint8 of a random, finite tensor of ``qtype``."""
    rng = np.random.default_rng(seed)
    if qtype == T.F32:
        return rng.standard_normal((rows, cols)).astype("<f4").view(np.uint8)
    if qtype == T.F16:
        return rng.standard_normal((rows, cols)).astype("<f2").view(np.uint8)
    if qtype == T.BF16:
        f = rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint32)
        return (f >> 16).astype("<u2").view(np.uint8)
    return random_blocks(qtype, rows, cols, rng)


@pytest.mark.parametrize("qtype", QUANT_TYPES + FLOAT_TYPES, ids=lambda t: t.name)
def test_decode_codes_bit_exact_on_random_blocks(qtype):
    rows, cols = 70, 512  # 70 rows: not a multiple of the 64-row interleave
    raw = random_tensor(qtype, rows, cols, seed=int(qtype))
    ref = quants.dequantize(raw, qtype).reshape(rows, cols)
    codes = decode_codes(qtype, raw, (rows, cols))
    w = codes.dequantize()
    bad = np.argwhere(w != ref)
    assert bad.size == 0, f"{qtype.name}: {len(bad)} values differ, first at {bad[0]}: {w[tuple(bad[0])]} vs " \
                          f"{ref[tuple(bad[0])]}"
    # the interleaved packing is lossless
    assert np.array_equal(pack(codes).dequantize(), w)


@pytest.mark.parametrize("qtype", QUANT_TYPES + FLOAT_TYPES, ids=lambda t: t.name)
def test_embedding_row_decoder_matches_gguf(qtype):
    rows, cols = 5, 512
    raw = random_tensor(qtype, rows, cols, seed=100 + int(qtype))
    ref = quants.dequantize(raw, qtype).reshape(rows, cols)
    out = np.empty(cols, np.float32)
    for r in range(rows):
        dequant_row(out, np.ascontiguousarray(raw[r]), int(qtype))
        # FMA contraction may round a*b - c once instead of twice: allow 1 ulp of the block scale.
        np.testing.assert_allclose(out, ref[r], rtol=2e-7, atol=1e-9, err_msg=f"{qtype.name} row {r}")


def product_bound(X: np.ndarray, W: np.ndarray) -> np.ndarray:
    """The documented float32-accumulation bound: cols * 2**-23 * |X| @ |W|.T (per output)."""
    return W.shape[1] * 2.0**-23 * (np.abs(X) @ np.abs(W).T) + 1e-30


@pytest.mark.parametrize("case", [(t, None) for t in QUANT_TYPES + [T.F32, T.F16]] + Q5_I8, ids=case_id)
@pytest.mark.parametrize("n_tok", [1, 5])
def test_matmul_within_stated_bound(case, n_tok):
    qtype, q5 = case
    rows, cols = 200, 768
    raw = random_tensor(qtype, rows, cols, seed=7)
    W = quants.dequantize(raw, qtype).reshape(rows, cols).astype(np.float64)
    pm = pack(decode_codes(qtype, raw, (rows, cols)), q5=q5)
    X = np.random.default_rng(1).standard_normal((n_tok, cols)).astype(np.float32)
    Y = matmul_packed(pm, X)
    ref = X.astype(np.float64) @ W.T
    err = np.abs(Y - ref)
    bound = product_bound(X.astype(np.float64), W)
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert np.all(err <= bound), f"{qtype.name}: worst {worst}: err {err[worst]:.3e} > bound {bound[worst]:.3e}"
    # and the bound is not vacuous: the result is far closer than the values themselves
    assert np.max(err) < 1e-4 * np.max(np.abs(ref))


def test_matmul_rejects_bad_shapes():
    raw = random_tensor(T.Q8_0, 64, 64)
    pm = pack(decode_codes(T.Q8_0, raw, (64, 64)))
    with pytest.raises(ValueError, match="expected|must be"):
        matmul_packed(pm, np.zeros((1, 32), np.float32))
    with pytest.raises(ValueError):
        matmul_packed(pm, np.zeros((1, 64), np.float64))


def test_decode_codes_errors_name_the_tensor():
    with pytest.raises(ModelFormatError, match="blk.0.x.*multiple of Q4_K block size"):
        decode_codes(T.Q4_K, np.zeros(144, np.uint8), (1, 100), "blk.0.x")
    with pytest.raises(ModelFormatError, match="bytes"):
        decode_codes(T.Q8_0, np.zeros(33, np.uint8), (1, 32), "t")
    with pytest.raises(ModelFormatError, match="unsupported"):
        decode_codes(T.IQ2_XXS, np.zeros(66, np.uint8), (1, 256), "t")
    assert T.IQ2_XXS not in SUPPORTED_TYPES


REAL = {
    "smollm2-135m": ["blk.0.attn_q.weight", "blk.3.ffn_down.weight", "token_embd.weight"],
    "qwen2.5-coder-0.5b": ["blk.0.ffn_gate.weight", "blk.0.ffn_down.weight", "blk.11.ffn_down.weight",
                           "blk.0.attn_v.weight", "output.weight"],
}


@pytest.mark.parametrize("model", list(REAL))
def test_real_tensors(model, gguf_reader):
    reader = gguf_reader(model)
    tensors = {t.name: t for t in reader.tensors}
    rng = np.random.default_rng(3)
    for name in REAL[model]:
        t = tensors[name]
        shape = (int(t.shape[1]), int(t.shape[0]))
        rows = min(shape[0], 640)  # a slice of rows keeps the float64 reference small
        row_bytes = t.data.reshape(-1).size // shape[0]
        raw = np.ascontiguousarray(t.data.reshape(-1)[: rows * row_bytes])
        ref = quants.dequantize(raw, t.tensor_type).reshape(rows, shape[1])
        codes = decode_codes(t.tensor_type, raw, (rows, shape[1]), name)
        assert np.array_equal(codes.dequantize(), ref), f"{model} {name} ({t.tensor_type.name})"
        pm = pack(codes)
        X = rng.standard_normal((3, shape[1])).astype(np.float32)
        Y = matmul_packed(pm, X)
        W = ref.astype(np.float64)
        assert np.all(np.abs(Y - X.astype(np.float64) @ W.T) <= product_bound(X.astype(np.float64), W)), name


@pytest.mark.parametrize("case", [(t, None) for t in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)] + [(T.Q5_0, "i8")],
                         ids=case_id)
def test_fast_raw_packing_equals_decode_then_pack(case):
    qtype, q5 = case
    rows, cols = 130, 256
    raw = random_tensor(qtype, rows, cols, seed=11)
    a = pack(decode_codes(qtype, raw, (rows, cols)), q5=q5)
    b = pack_raw(qtype, raw, (rows, cols), q5=q5)
    assert (a.family, a.rows, a.cols, a.group) == (b.family, b.rows, b.cols, b.group)
    for x, y in ((a.q, b.q), (a.s, b.s), (a.m, b.m)):
        assert x.shape == y.shape and np.array_equal(x, y)
    assert pack_raw(T.F16, np.zeros((4, 512), np.uint8), (4, 256)) is None  # float types go through pack()
    assert pack_raw(T.Q5_1, random_tensor(T.Q5_1, 4, 256), (4, 256), q5="i8") is None  # falls back to pack()


@pytest.mark.parametrize("case", [(t, None) for t in (T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q6_K, T.F32)]
                         + Q5_I8, ids=case_id)
def test_prefill_blas_path_within_bound(case):
    """T >= BLAS_MIN_T goes through dequantized sgemm: same bound, and the dequantized chunk is exact."""
    from apr_numba.kernels.matmul import BLAS_MIN_T, dequant_rows, packed_tuple

    qtype, q5 = case
    rows, cols = 200, 512
    raw = random_tensor(qtype, rows, cols, seed=5)
    W = quants.dequantize(raw, qtype).reshape(rows, cols).astype(np.float64)
    pm = pack(decode_codes(qtype, raw, (rows, cols)), q5=q5)
    out = np.empty((pm.s.shape[0] * 64, cols), np.float32)
    dequant_rows(out, packed_tuple(pm), 0)
    assert np.array_equal(out[:rows], W.astype(np.float32))
    X = np.random.default_rng(2).standard_normal((BLAS_MIN_T + 3, cols)).astype(np.float32)
    Y = matmul_packed(pm, X)
    err = np.abs(Y - X.astype(np.float64) @ W.T)
    assert np.all(err <= product_bound(X.astype(np.float64), W))


@pytest.mark.parametrize("qtype", [T.Q5_0, T.Q5_1], ids=lambda t: t.name)
def test_q5_layouts(qtype, monkeypatch):
    """Q5_0 / Q5_1 pack to FAMILY_U5 by default (0.8125 B/value + offsets), to FAMILY_I8 with the switch; both
    lossless; the environment variable selects the default."""
    rows, cols = 70, 512
    raw = random_tensor(qtype, rows, cols, seed=21)
    ref = quants.dequantize(raw, qtype).reshape(rows, cols)
    codes = decode_codes(qtype, raw, (rows, cols))
    G = -(-rows // 64)
    has_m = qtype == T.Q5_1
    u5, i8 = pack(codes, q5="u5"), pack(codes, q5="i8")
    assert (u5.family, i8.family) == (FAMILY_U5, FAMILY_I8)
    assert u5.q.shape == (G, cols // 32, 11, 128) and u5.m.shape == (G, cols // 32 if has_m else 0, 64)
    assert u5.nbytes == G * 64 * cols // 32 * (22 + 4 + 4 * has_m)
    assert i8.nbytes == G * 64 * cols // 32 * (32 + 4 + 4 * has_m)
    for pm in (u5, i8):
        assert np.array_equal(pm.dequantize(), ref)
    monkeypatch.setenv("APR_NUMBA_Q5_LAYOUT", "i8")
    assert q5_layout() == "i8" and pack(codes).family == FAMILY_I8
    monkeypatch.setenv("APR_NUMBA_Q5_LAYOUT", "u5")
    assert q5_layout() == "u5" and pack(codes).family == FAMILY_U5
    monkeypatch.setenv("APR_NUMBA_Q5_LAYOUT", "u6")
    with pytest.raises(ValueError, match="APR_NUMBA_Q5_LAYOUT"):
        q5_layout()


@pytest.mark.parametrize("qtype", [T.Q5_0, T.Q5_1], ids=lambda t: t.name)
def test_u5_word_split_is_exact(qtype):
    """With one-hot inputs the U5 kernels return single weights: every code position of the 16-bit words is split
    exactly (decode path T = 1 and the 4-token tile, T = 5), not just within the rounding bound."""
    from apr_numba.kernels.matmul import matmul3, packed_tuple

    rows, cols = 70, 64
    raw = random_tensor(qtype, rows, cols, seed=23)
    W = quants.dequantize(raw, qtype).reshape(rows, cols)
    w = packed_tuple(pack(decode_codes(qtype, raw, (rows, cols)), q5="u5"))
    eye = np.eye(cols, dtype=np.float32)
    for c0 in range(0, cols, 5):
        X = np.ascontiguousarray(eye[c0:c0 + 5])
        out = np.zeros((X.shape[0], rows), np.float32)
        matmul3(out, X, w, w, w, 1)
        assert np.array_equal(out, W[:, c0:c0 + 5].T), (qtype.name, c0)
