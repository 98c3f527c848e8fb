"""The K/IQ decoders on blocks llama.cpp's own quantizer wrote (issue 13: "each new quant type decodes bit-exactly").

tests/fixtures/requant/quant_samples.gguf (tests/fixtures/make_quant_samples.py) holds the first rows of real
tensors of the requantized SmolLM2 / Qwen2.5 files: Q2_K, Q3_K, Q5_K, IQ4_XS, IQ4_NL (llama.cpp's fallback for
widths that are not a multiple of 256), Q4_K and Q6_K. Read with gguf-py's ``GGUFReader``; the reference is
``gguf.quants.dequantize`` (llama.cpp's gguf-py), and a float64 NumPy product of those weights for the kernels.

For every tensor: the decoded codes and scales, the resident packed layout (both Q5_K layouts) and the load-time
fast packer when it takes the type equal gguf-py bit for bit; so does the row-chunk decoder the BLAS prefill
multiplies (``dequant_rows``); the embedding row decoder (``dequant_row``) is bit-exact except for the offset
types, where FMA contraction may round ``d*q - m`` once instead of twice (<= 1 ulp, as in tests/test_kquants.py);
decode (T = 1), the 4-token tile (T = 5) and prefill products stay within the bound the matmul module states,
``cols * 2**-23 * |X| @ |W|.T``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf import GGUFReader, quants

from apr_numba.kernels.embed import dequant_row
from apr_numba.kernels.matmul import BLAS_MIN_T, dequant_rows, matmul_packed, packed_tuple
from apr_numba.quants.layouts import decode_codes
from apr_numba.quants.repack import pack, pack_raw
from tests.test_quants import product_bound

SAMPLES = Path(__file__).resolve().parent / "fixtures" / "requant" / "quant_samples.gguf"
REQUIRED = {GT.Q2_K, GT.Q3_K, GT.Q5_K, GT.IQ4_XS, GT.IQ4_NL}
OFFSET_TYPES = {GT.Q2_K, GT.Q4_K, GT.Q5_K}  # w = d*q - m: one FMA may round once


def _tensors():
    r = GGUFReader(str(SAMPLES))
    out = []
    for t in r.tensors:
        ty = GT(int(t.tensor_type))
        rows, cols = int(t.shape[1]), int(t.shape[0])  # gguf-py: ggml order (cols, rows)
        raw = np.ascontiguousarray(np.asarray(t.data).view(np.uint8).reshape(rows, -1))
        out.append(pytest.param(t.name, ty, raw, rows, cols, id=t.name))
    return out


TENSORS = _tensors()


def test_samples_hold_every_new_type_from_real_files():
    r = GGUFReader(str(SAMPLES))
    types = {GT(int(t.tensor_type)) for t in r.tensors}
    assert REQUIRED <= types, REQUIRED - types
    assert SAMPLES.stat().st_size < 3_000_000
    srcs = [f.contents() for k, f in r.fields.items() if k.startswith("apr_numba.sample.") and k[-1].isdigit()]
    assert len(srcs) == len(r.tensors) and all(len(s.split(" / ")[0]) == 64 for s in srcs)  # a sha256 each


@pytest.mark.parametrize("name,ty,raw,rows,cols", TENSORS)
def test_real_blocks_decode_bit_exactly(name, ty, raw, rows, cols):
    ref = quants.dequantize(raw, ty).reshape(rows, cols)
    assert np.isfinite(ref).all() and np.abs(ref).max() > 0
    codes = decode_codes(int(ty), raw, (rows, cols), name)
    bad = np.argwhere(codes.dequantize() != ref)
    assert bad.size == 0, f"{len(bad)} values differ, first at {bad[0]}"
    for q5 in (("u5", "i8") if ty == GT.Q5_K else (None,)):
        pm = pack(codes, q5=q5)
        assert np.array_equal(pm.dequantize(), ref), q5
        chunk = np.empty((pm.s.shape[0] * 64, cols), np.float32)  # what the BLAS prefill path multiplies
        dequant_rows(chunk, packed_tuple(pm), 0)
        assert np.array_equal(chunk[:rows], ref), q5
    fast = pack_raw(int(ty), raw, (rows, cols))
    if fast is not None:  # the load-time packer for the types it takes
        assert np.array_equal(fast.dequantize(), ref)
    out = np.empty(cols, np.float32)
    for r in range(rows):
        dequant_row(out, raw[r], int(ty))
        if ty in OFFSET_TYPES:
            np.testing.assert_allclose(out, ref[r], rtol=2e-7, atol=1e-9, err_msg=f"row {r}")
        else:
            assert np.array_equal(out, ref[r]), f"row {r}"


@pytest.mark.parametrize("n_tok", [1, 5, BLAS_MIN_T + 3])
@pytest.mark.parametrize("name,ty,raw,rows,cols", TENSORS)
def test_real_blocks_products_within_the_stated_bound(name, ty, raw, rows, cols, n_tok):
    W = quants.dequantize(raw, ty).reshape(rows, cols).astype(np.float64)
    X = np.random.default_rng(n_tok).standard_normal((n_tok, cols)).astype(np.float32)
    ref = X.astype(np.float64) @ W.T
    bound = product_bound(X.astype(np.float64), W)
    for q5 in (("u5", "i8") if ty == GT.Q5_K else (None,)):
        Y = matmul_packed(pack(decode_codes(int(ty), raw, (rows, cols)), q5=q5), X)
        err = np.abs(Y - ref)
        worst = np.unravel_index(np.argmax(err / bound), err.shape)
        assert np.all(err <= bound), f"{q5}: worst {worst}: err {err[worst]:.3e} > bound {bound[worst]:.3e}"
        assert np.max(err) < 1e-4 * np.max(np.abs(ref))
