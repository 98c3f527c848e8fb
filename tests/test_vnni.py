"""The int8-activation path (apr_numba/kernels/vnni.py, apr_numba/quants/vnni_pack.py) against independent references.

* The activation quantizer against gguf-py's own Q8_0 quantizer (``gguf.quants.quantize``, llama.cpp's reference
  ``quantize_row_q8_0`` in NumPy): the same codes and scales.
* Products against float64 ``dequantize(Q8_0(x)) @ W.T`` with W from ``gguf.quants.dequantize`` of random valid
  blocks, for every type whose family has a VNNI layout, at T = 1 (decode), T = 5 (the 4-token tile plus one),
  both through the intrinsic and through the generic IR (the portable path), and on the BLAS prefill path.
* The layout change is lossless (to_vnni then from_vnni gives the same bytes; dequantize is bit for bit gguf-py's).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from apr_numba.kernels.matmul import BLAS_MIN_T, matmul_packed
from apr_numba.kernels.vnni import host_has_vnni, quantize_x8
from apr_numba.quants.blocks import FAMILY_I8V, FAMILY_U4V, FAMILY_U5V
from apr_numba.quants.layouts import decode_codes
from apr_numba.quants.repack import pack, pack_raw
from apr_numba.quants.vnni_pack import activation_mode, from_vnni, to_vnni
from tests.tiny_gguf import random_blocks

T = GGMLQuantizationType
# every type that packs into U4, U5, or I8 with 16 or 32 codes per block (Q5 types in their default U5 layout)
VNNI_TYPES = {T.Q4_0: FAMILY_U4V, T.Q4_1: FAMILY_U4V, T.Q4_K: FAMILY_U4V, T.Q8_0: FAMILY_I8V, T.Q6_K: FAMILY_I8V,
              T.Q2_K: FAMILY_I8V, T.Q3_K: FAMILY_I8V, T.IQ4_NL: FAMILY_I8V, T.IQ4_XS: FAMILY_I8V,
              T.Q5_0: FAMILY_U5V, T.Q5_1: FAMILY_U5V, T.Q5_K: FAMILY_U5V}


def q8_reference(X: np.ndarray) -> np.ndarray:
    """float64 dequantize(quantize_Q8_0(X)) row by row with gguf-py (llama.cpp's reference quantizer)."""
    raw = quants.quantize(X.astype(np.float32), T.Q8_0)
    return quants.dequantize(raw, T.Q8_0).reshape(X.shape).astype(np.float64)


def int8_x(X):
    Tn, C = X.shape
    XW = np.empty((Tn, C // 4), np.int32)
    DX = np.empty((Tn, C // 32), np.float32)
    XS = np.empty((Tn, C // 16), np.float32)
    XI = np.empty((Tn, C // 16), np.int32)
    quantize_x8(X, XW, DX, XS, XI)
    return XW, DX, XS, XI


def test_activation_quantizer_equals_gguf_q8_0():
    rng = np.random.default_rng(1)
    X = (rng.standard_normal((3, 512)) * np.array([[0.01], [1.0], [300.0]])).astype(np.float32)
    X[1, :32] = 0.0  # an all-zero block: d = 0, codes 0
    XW, DX, XS, XI = int8_x(X)
    raw = quants.quantize(X, T.Q8_0).reshape(3, 512 // 32, 34)
    d_ref = raw[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    q_ref = raw[..., 2:].copy().view(np.int8).reshape(3, 512)
    q = XW.view(np.int8).reshape(3, 512)
    assert np.array_equal(q, q_ref)
    # gguf-py stores d as float16; ours is the float32 it rounds
    assert np.array_equal(DX.astype(np.float16).astype(np.float32), d_ref)
    assert np.array_equal(XI, q_ref.reshape(3, 32, 16).sum(-1))
    np.testing.assert_allclose(XS, DX.repeat(2, 1) * XI, rtol=1e-6)


def test_activation_mode_env(monkeypatch):
    monkeypatch.delenv("APR_NUMBA_ACTIVATIONS", raising=False)
    assert activation_mode() == "f32"
    monkeypatch.setenv("APR_NUMBA_ACTIVATIONS", "INT8")
    assert activation_mode() == "int8"
    with pytest.raises(ValueError, match="APR_NUMBA_ACTIVATIONS"):
        activation_mode("int4")


def _matrix(qtype, rows, cols, seed):
    raw = random_blocks(qtype, rows, cols, np.random.default_rng(seed))
    W = quants.dequantize(raw, qtype).reshape(rows, cols).astype(np.float64)
    pm = pack_raw(qtype, raw, (rows, cols), q5="u5") or pack(decode_codes(qtype, raw, (rows, cols)), q5="u5")
    return W, pm


@pytest.mark.parametrize("qtype", list(VNNI_TYPES), ids=lambda t: t.name)
def test_layout_lossless(qtype):
    W, pm = _matrix(qtype, 130, 512, seed=int(qtype))
    v = to_vnni(pm)
    assert v.family == VNNI_TYPES[qtype]
    if v.family == FAMILY_U5V:  # docs/kernels.md: 16 B of nibbles + 4 B of bit-4 masks per 32 values and row
        G, nb = pm.q.shape[:2]
        assert v.q.shape == (G, nb, 20, 64) and v.q.nbytes == G * 64 * 512 // 32 * 20
    else:
        assert v.q.shape == pm.q.shape and v.nbytes == pm.nbytes
    assert not np.array_equal(v.q, pm.q)  # the bytes did move
    back = from_vnni(v)
    assert back.family == pm.family and np.array_equal(back.q, pm.q)
    assert np.array_equal(v.dequantize().astype(np.float64), W)


def _check_products(pm, W, X, what):
    Xq = q8_reference(X)
    ref = Xq @ W.T
    bound = X.shape[1] * 2.0 ** -23 * (np.abs(Xq) @ np.abs(W).T) * 4 + 1e-30
    Y = matmul_packed(pm, X)
    err = np.abs(Y - ref)
    assert (err <= bound).all(), f"{what}: worst {float((err / bound).max()):.2f} x bound"
    return Y


@pytest.mark.parametrize("qtype", list(VNNI_TYPES), ids=lambda t: t.name)
def test_products_equal_q8_reference(qtype):
    rows, cols = 130, 512  # three row groups, the last partial
    W, pm = _matrix(qtype, rows, cols, seed=int(qtype) + 100)
    v = to_vnni(pm)
    rng = np.random.default_rng(int(qtype))
    for n in (1, 5, BLAS_MIN_T):
        X = rng.standard_normal((n, cols)).astype(np.float32)
        if n < BLAS_MIN_T:
            _check_products(v, W, X, f"{qtype.name} T={n}")
        else:  # the BLAS prefill path dequantizes the layout exactly and keeps float activations
            Y = matmul_packed(v, X)
            np.testing.assert_allclose(Y, matmul_packed(pm, X), rtol=0, atol=1e-4 * np.abs(Y).max())
    # and the int8 result is close to the float product (llama.cpp's quantization error, ~1e-5 in cosine)
    X = rng.standard_normal((1, cols)).astype(np.float32)
    y, yf = matmul_packed(v, X)[0], (X.astype(np.float64) @ W.T)[0]
    assert float(y @ yf / np.linalg.norm(y) / np.linalg.norm(yf)) > 0.9999


GENERIC = r"""
import numpy as np, sys
sys.path.insert(0, ".")
from tests.test_vnni import _matrix, _check_products, VNNI_TYPES
from apr_numba.quants.vnni_pack import to_vnni
rng = np.random.default_rng(7)
for qt in VNNI_TYPES:
    W, pm = _matrix(qt, 70, 256, seed=int(qt) + 7)
    for n in (1, 4):
        _check_products(to_vnni(pm), W, rng.standard_normal((n, 256)).astype(np.float32), f"{qt.name} T={n}")
print("generic ok")
"""


def test_generic_ir_path(tmp_path):
    """The portable path (generic LLVM IR instead of the vpdpbusd intrinsic), compiled fresh in a child."""
    env = dict(os.environ, APR_NUMBA_VNNI_IR="generic", NUMBA_CACHE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", GENERIC], env=env, capture_output=True, text=True, timeout=900,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0 and "generic ok" in r.stdout, r.stderr[-3000:]


def test_host_reports_vnni_on_this_class_of_machine():
    """Not a skip: the machines this project targets report VNNI; if one does not, the intrinsic is not used."""
    from llvmlite import binding as llvm

    assert host_has_vnni() == bool(llvm.get_host_cpu_features().get("avx512vnni", False))
