"""Q2_K, Q3_K, Q5_K, IQ4_NL and IQ4_XS (apr_numba/quants/kquants.py) against gguf-py.

Independent references: ``gguf.quants.dequantize`` (llama.cpp's gguf-py) on random valid blocks (random bytes,
bounded float16 scales) for decoding, packing and the embedding row decoder; float64 ``X @ W.T`` of those
weights for the products (decode T = 1, the 4-token tile T = 5, the BLAS prefill path); the float64 reference
backend (apr_numba/reference.py, which dequantizes with gguf-py) for a whole tiny model; the GGUF bytes for the
.apr round trip.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from apr_numba.kernels.embed import dequant_row
from apr_numba.kernels.matmul import BLAS_MIN_T, dequant_rows, matmul_packed, packed_tuple
from apr_numba.quants.layouts import FAMILY_I8, FAMILY_U5, SUPPORTED_TYPES, decode_codes
from apr_numba.quants.repack import pack
from tests.test_quants import product_bound
from tests.tiny_gguf import random_blocks

T = GGMLQuantizationType
NEW_TYPES = [T.Q2_K, T.Q3_K, T.Q5_K, T.IQ4_NL, T.IQ4_XS]
# (rows, cols): one row, fewer rows than a 64-row group, several groups with a partial last one
SHAPES = [(1, 256), (70, 512), (130, 768)]
# Resident bytes per weight of the packed layout (codes + float32 scale [+ offset] per sub-block), derived from
# the layout in docs/kernels.md, not from the code: group g, int8 codes 1 B, U5 22 B per 32.
RESIDENT_B_PER_VALUE = {T.Q2_K: 1 + 8 / 16, T.Q3_K: 1 + 4 / 16, T.Q5_K: (22 + 8) / 32, T.IQ4_NL: 1 + 4 / 32,
                        T.IQ4_XS: 1 + 4 / 32}


def ids(t) -> str:
    return t.name


def rand(qtype, rows, cols, seed):
    return random_blocks(qtype, rows, cols, np.random.default_rng(seed))


def ref_weights(qtype, raw, rows, cols) -> np.ndarray:
    return quants.dequantize(raw, qtype).reshape(rows, cols)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("qtype", NEW_TYPES, ids=ids)
def test_decode_bit_exact_and_packing_lossless(qtype, shape):
    rows, cols = shape
    raw = rand(qtype, rows, cols, seed=int(qtype) * 7 + rows)
    ref = ref_weights(qtype, raw, rows, cols)
    assert np.isfinite(ref).all() and np.abs(ref).max() > 0
    codes = decode_codes(qtype, raw, (rows, cols))
    w = codes.dequantize()
    bad = np.argwhere(w != ref)
    assert bad.size == 0, f"{qtype.name}: {len(bad)} values differ, first at {bad[0]}"
    layouts = ("u5", "i8") if qtype == T.Q5_K else (None,)
    for q5 in layouts:
        pm = pack(codes, q5=q5)
        assert np.array_equal(pm.dequantize(), ref), (qtype.name, q5)


@pytest.mark.parametrize("qtype", NEW_TYPES, ids=ids)
def test_resident_bytes_per_weight(qtype):
    rows, cols = 128, 512  # two full row groups: no padding rows
    codes = decode_codes(qtype, rand(qtype, rows, cols, 1), (rows, cols))
    pm = pack(codes)
    assert pm.family == (FAMILY_U5 if qtype == T.Q5_K else FAMILY_I8)
    assert pm.nbytes / (rows * cols) == RESIDENT_B_PER_VALUE[qtype]
    assert qtype in SUPPORTED_TYPES


def test_q3_k_and_iq4_codes_cover_their_ranges():
    """The signed codes reach both ends (Q3_K -4..3, IQ4 the table's -127..113): sign handling is exercised."""
    c3 = decode_codes(T.Q3_K, rand(T.Q3_K, 8, 256, 2), (8, 256)).codes
    assert (c3.min(), c3.max()) == (-4, 3)
    for t in (T.IQ4_NL, T.IQ4_XS):
        c = decode_codes(t, rand(t, 8, 256, 3), (8, 256)).codes
        assert (c.min(), c.max()) == (-127, 113) and len(np.unique(c)) == 16


@pytest.mark.parametrize("qtype", NEW_TYPES, ids=ids)
def test_embedding_row_decoder_matches_gguf(qtype):
    rows, cols = 5, 512
    raw = rand(qtype, rows, cols, seed=100 + int(qtype))
    ref = ref_weights(qtype, raw, rows, cols)
    out = np.empty(cols, np.float32)
    for r in range(rows):
        dequant_row(out, np.ascontiguousarray(raw[r]), int(qtype))
        # FMA contraction may round a*b - c once instead of twice (Q2_K, Q5_K offsets): 1 ulp of the scale
        np.testing.assert_allclose(out, ref[r], rtol=2e-7, atol=1e-9, err_msg=f"{qtype.name} row {r}")
        if qtype not in (T.Q2_K, T.Q5_K):  # no offset: a single product, bit for bit
            assert np.array_equal(out, ref[r])


@pytest.mark.parametrize("n_tok", [1, 5, BLAS_MIN_T + 3])
@pytest.mark.parametrize("qtype, q5", [(t, None) for t in NEW_TYPES] + [(T.Q5_K, "i8")],
                         ids=[t.name for t in NEW_TYPES] + ["Q5_K-i8"])
def test_matmul_within_stated_bound(qtype, q5, n_tok):
    """Decode (T = 1), the 4-token tile (T = 5) and the BLAS prefill path: within cols * 2**-23 * |x||w|."""
    rows, cols = 130, 768
    raw = rand(qtype, rows, cols, seed=7)
    W = ref_weights(qtype, raw, rows, cols).astype(np.float64)
    pm = pack(decode_codes(qtype, raw, (rows, cols)), q5=q5)
    if n_tok >= BLAS_MIN_T:  # the chunk BLAS multiplies is the exact dequantized matrix
        out = np.empty((pm.s.shape[0] * 64, cols), np.float32)
        dequant_rows(out, packed_tuple(pm), 0)
        assert np.array_equal(out[:rows], W.astype(np.float32))
    X = np.random.default_rng(n_tok).standard_normal((n_tok, cols)).astype(np.float32)
    Y = matmul_packed(pm, X)
    ref = X.astype(np.float64) @ W.T
    err = np.abs(Y - ref)
    bound = product_bound(X.astype(np.float64), W)
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert np.all(err <= bound), f"{qtype.name}: worst {worst}: err {err[worst]:.3e} > bound {bound[worst]:.3e}"
    assert np.max(err) < 1e-4 * np.max(np.abs(ref))


# -- a whole tiny model ------------------------------------------------------------------------------------

MATS = ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight", "blk.0.attn_output.weight",
        "blk.0.ffn_gate.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight"]
DIMS = (256, 2, 512, 300)  # n_embd, n_head, n_ff, n_vocab: rows a multiple of the 256-value super-blocks
PROMPT = [5, 77, 256, 3, 299, 42, 17, 200]


def model_mix(lead) -> dict[str, T]:
    """token_embd (tied: also the LM head) of type ``lead``, the 7 matrices cycling through every new type from
    ``lead`` on, and one norm vector quantized (the float32 vector loader)."""
    k = NEW_TYPES.index(lead)
    mix = {name: NEW_TYPES[(k + i) % len(NEW_TYPES)] for i, name in enumerate(MATS)}
    return {"token_embd.weight": lead, "blk.0.ffn_norm.weight": T.IQ4_NL, **mix}


@pytest.fixture(scope="module", params=NEW_TYPES, ids=ids)
def tiny_model(request, tmp_path_factory):
    from tests.tiny_gguf import write_tiny_gguf

    path = tmp_path_factory.mktemp("kq") / f"tiny-{request.param.name}.gguf"
    write_tiny_gguf(path, quant=model_mix(request.param), dims=DIMS)
    return path


def test_tiny_model_matches_float64_reference(tiny_model):
    """Every matrix of a tiny llama in the new types: CPU logits (prefill of 8 tokens, then decode steps through the
    KV cache) against the float64 NumPy reference over gguf-py's dequantized weights."""
    from apr_numba import load
    from apr_numba.backends.reference import ReferenceModel
    from apr_numba.formats.gguf_file import GGUFFile

    src = GGUFFile(tiny_model, use_cache=False)
    assert {T(src.tensors[n].ggml_type) for n in MATS} == set(NEW_TYPES)
    m = load(tiny_model, backend="cpu", n_ctx=16, warmup=False)
    ref = ReferenceModel(tiny_model).forward(PROMPT).logits  # (T, n_vocab) float64
    got = m.logits(PROMPT)
    for t in range(len(PROMPT)):
        a, b = got[t].astype(np.float64), ref[t]
        cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        assert cos >= 0.9999, (t, cos)  # observed 1 - cos ~ 3e-14
        assert np.abs(a - b).max() < 1e-5 * np.abs(b).max(), t  # observed ~6e-7
        assert np.argmax(a) == np.argmax(b)
    assert np.std(ref[-1]) > 1e-3  # the logits are not flat: the check means something


def test_apr_import_round_trip_is_lossless(tiny_model, tmp_path):
    """GGUF -> .apr keeps every tensor's bytes and GGML type (dtype byte = GGML id), and a model loaded from the
    .apr gives the GGUF's logits bit for bit."""
    from apr_numba import load
    from apr_numba.formats.apr_file import AprFile
    from apr_numba.formats.apr_import import import_model
    from apr_numba.formats.gguf_header import read_gguf

    r = import_model(tiny_model, tmp_path / "tiny.apr")
    apr = AprFile(r.path)
    _, table = read_gguf(tiny_model)
    mm = np.memmap(tiny_model, dtype=np.uint8, mode="r")
    for name, t in table.items():
        a = apr.tensors[name]
        assert (a.ggml_type, a.shape, a.nbytes) == (t.ggml_type, t.shape, t.nbytes), name
        assert np.array_equal(apr.data(name), mm[t.offset:t.offset + t.nbytes]), name
    assert {int(apr.tensors[n].ggml_type) for n in MATS} == {int(t) for t in NEW_TYPES}
    mg = load(tiny_model, backend="cpu", n_ctx=16, warmup=False)
    ma = load(r.path, backend="cpu", n_ctx=16, warmup=False)
    assert np.array_equal(mg.logits(PROMPT), ma.logits(PROMPT))
