"""BERT encoder (issue 8): parity with HF ``BertModel`` and sentence-transformers on all-MiniLM-L6-v2.

Fixtures: ``tests/fixtures/hf_minilm-l6.npz`` / ``.json`` made by ``make_encoder_fixtures.py`` (torch is
not needed here). Tolerances: last_hidden_state max abs <= 1e-4 (measured ~3e-6), cosine of normalised
mean embeddings >= 0.99999 (measured >= 0.9999999). Batch vs one-by-one is asserted *bit for bit*: the
batch is ragged (no padding is computed) and every kernel reduces per row in an order fixed by the row
and its own sequence, so nothing else in the batch can change a text's arithmetic.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from apr_numba.encoder.embedding import embed, embed_ids, pool
from apr_numba.encoder.model import EncoderModel, TruncationWarning, load_encoder
from apr_numba.encoder.weights import EncoderConfig, load_encoder_weights
from apr_numba.errors import ArgumentError, ModelFormatError
from apr_numba.kernels import encoder as K

FIX = Path(__file__).parent / "fixtures"
ATOL = 1e-4
COS_MIN = 0.99999


@pytest.fixture(scope="module")
def fx():
    meta = json.loads((FIX / "hf_minilm-l6.json").read_text(encoding="utf-8"))
    with np.load(FIX / "hf_minilm-l6.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return meta, arrays


@pytest.fixture(scope="module")
def enc() -> EncoderModel:
    return load_encoder("minilm-l6", threads=2)


def _ids(fx):
    meta, a = fx
    return [a[f"ids_{i}"].astype(np.int64) for i in range(len(meta["sentences"]))]


# -- parity with HF ---------------------------------------------------------------------------------
def test_token_ids_match_hf(enc, fx):
    meta, _ = fx
    got = enc.tokenize(meta["sentences"])
    for i, ref in enumerate(_ids(fx)):
        assert got[i].tolist() == ref.tolist(), meta["sentences"][i]


def test_last_hidden_state_one_by_one(enc, fx):
    meta, a = fx
    for i, ids in enumerate(_ids(fx)):
        h = enc.encode_hidden(ids)
        assert h.shape == (len(ids), 384) and h.dtype == np.float32
        err = float(np.abs(h - a[f"lhs_{i}"]).max())
        assert err <= ATOL, (meta["sentences"][i], err)


def test_last_hidden_state_padded_batch(enc, fx):
    """The padded (batch, seq) API with an attention mask, against HF's own padded batch."""
    _, a = fx
    ids = _ids(fx)
    S = max(len(x) for x in ids)
    batch = np.zeros((len(ids), S), np.int64)
    mask = np.zeros((len(ids), S), np.int64)
    for b, x in enumerate(ids):
        batch[b, :len(x)], mask[b, :len(x)] = x, 1
    out = enc.forward(batch, mask)
    assert out.shape == (len(ids), S, 384)
    for b, x in enumerate(ids):
        n = len(x)
        assert float(np.abs(out[b, :n] - a[f"lhs_batch_{b}"]).max()) <= ATOL
        assert not out[b, n:].any()  # masked rows are zeros
        assert np.array_equal(out[b, :n], enc.encode_hidden(x))  # padding changes nothing, bit for bit


def test_layer_outputs_match_hf(enc, fx):
    _, a = fx
    ids = _ids(fx)[0]
    last, layers = enc.forward(ids[None], capture_layers=True)
    ref = a["hidden_0"]
    assert layers.shape == (enc.n_layer + 1, 1, len(ids), enc.hidden_size) == (7, 1, len(ids), 384)
    for k in range(ref.shape[0]):
        assert float(np.abs(layers[k, 0] - ref[k]).max()) <= ATOL, k
    assert np.array_equal(layers[-1], last)


def test_sentence_transformers_cosine(enc, fx):
    meta, a = fx
    e = embed(enc, meta["sentences"])
    assert e.shape == (len(meta["sentences"]), 384) and e.dtype == np.float32
    for i in range(e.shape[0]):
        ref = a[f"st_{i}"].astype(np.float64)
        v = e[i].astype(np.float64)
        cos = v @ ref / (np.linalg.norm(v) * np.linalg.norm(ref))
        assert cos >= COS_MIN, (meta["sentences"][i], cos)
        assert abs(np.linalg.norm(v) - 1.0) < 1e-6


# -- batching, pooling -------------------------------------------------------------------------------
def test_batch_equals_one_by_one_bitwise(enc, fx):
    meta, _ = fx
    ids = _ids(fx)
    x, lengths = enc.encode_ragged(ids)
    off = 0
    for i, n in enumerate(lengths):
        assert np.array_equal(x[off:off + n], enc.encode_hidden(ids[i])), i
        off += n
    texts = meta["sentences"]
    full = embed(enc, texts, batch_size=32)
    assert np.array_equal(full, embed(enc, texts, batch_size=3))
    for i, t in enumerate(texts):
        assert np.array_equal(full[i], embed(enc, [t])[0]), i


def test_cls_pooling_is_row0_bitwise(enc, fx):
    meta, _ = fx
    e = embed(enc, meta["sentences"], pooling="cls", normalize=False)
    for i, ids in enumerate(_ids(fx)):
        assert np.array_equal(e[i], enc.encode_hidden(ids)[0]), i
    en = embed(enc, meta["sentences"][:2], pooling="cls")
    assert np.allclose(np.linalg.norm(en, axis=1), 1.0, atol=1e-6)


def test_mean_pool_matches_numpy(enc, fx):
    ids = _ids(fx)[:3]
    x, lengths = enc.encode_ragged(ids)
    got = pool(x, lengths, "mean", normalize=False)
    off = 0
    for i, n in enumerate(lengths):
        assert np.allclose(got[i], x[off:off + n].astype(np.float64).mean(0), atol=1e-7)
        off += n


# -- bad input ---------------------------------------------------------------------------------------
def test_input_errors(enc):
    with pytest.raises(ArgumentError, match="empty list"):
        embed(enc, [])
    with pytest.raises(ArgumentError, match=r"texts\[1\] is int"):
        embed(enc, ["ok", 3])
    with pytest.raises(ArgumentError, match="bytes"):
        embed(enc, b"raw")
    with pytest.raises(ArgumentError, match="pooling"):
        embed(enc, ["x"], pooling="max")
    with pytest.raises(ArgumentError, match="max_length"):
        embed(enc, ["x"], max_length=1)
    with pytest.raises(ArgumentError, match="batch_size"):
        embed_ids(enc, [np.array([101, 102])], batch_size=0)
    assert embed(enc, "one text").shape == (1, 384)  # a str is one text
    with pytest.raises(ArgumentError, match="non-empty"):
        enc.encode_hidden([])
    with pytest.raises(ArgumentError, match="out of range"):
        enc.encode_hidden([101, 30522, 102])
    with pytest.raises(ArgumentError, match="512 positions"):
        enc.encode_hidden(np.full(513, 1000))


def test_over_long_text(enc):
    long = "word " * 600  # 602 tokens with [CLS]/[SEP]
    with pytest.raises(ArgumentError, match=r"text 1 has 602 tokens, more than max_length 512"):
        embed(enc, ["short", long], truncate=False)
    with pytest.warns(TruncationWarning, match="text 0: 602 tokens truncated to 512"):
        ids = enc.tokenize([long])
    assert len(ids[0]) == 512 and ids[0][0] == 101 and ids[0][-1] == 102
    with pytest.warns(TruncationWarning):
        e = embed(enc, [long, "x"], max_length=16)
    cut = enc.tokenize(["word " * 14])[0]  # exactly 16 tokens: the truncated text
    assert len(cut) == 16
    assert np.array_equal(e[0], embed_ids(enc, [cut])[0])


def test_forward_embeddings_finite(enc):
    """ENC-002 helper: random layer-0 inputs in [-10, 10], with padding, give finite outputs."""
    rng = np.random.default_rng(8)
    x = rng.uniform(-10, 10, (3, 9, 384)).astype(np.float32)
    mask = np.ones((3, 9), bool)
    mask[1, 5:] = False
    mask[2, 1:] = False
    out, layers = enc.forward_embeddings(x, mask, capture_layers=True)
    assert out.shape == (3, 9, 384) and layers.shape == (7, 3, 9, 384)
    assert np.isfinite(out).all() and np.isfinite(layers).all()
    assert not out[1, 5:].any() and out[1, :5].any()
    assert np.array_equal(out[1, :5], enc.forward_embeddings(x[1, :5]))  # padding-free, bit for bit
    with pytest.raises(ArgumentError):
        enc.forward_embeddings(np.zeros((2, 3, 10), np.float32))


# -- kernels against plain NumPy ----------------------------------------------------------------------
def test_kernels_against_numpy():
    rng = np.random.default_rng(0)
    # linear: float64 reference and bitwise independence of the batch size
    X = rng.standard_normal((11, 96)).astype(np.float32)
    W = rng.standard_normal((70, 96)).astype(np.float32)
    b = rng.standard_normal(70).astype(np.float32)
    out = np.empty((11, 70), np.float32)
    K.linear(out, X, W, b)
    ref = X.astype(np.float64) @ W.T.astype(np.float64) + b
    assert np.abs(out - ref).max() <= 96 * 2 ** -23 * (np.abs(X) @ np.abs(W).T + np.abs(b)).max()
    for lo, hi in ((0, 1), (3, 10), (5, 11)):
        part = np.empty((hi - lo, 70), np.float32)
        K.linear(part, X[lo:hi].copy(), W, b)
        assert np.array_equal(part, out[lo:hi])
    # layernorm / gelu
    x = rng.standard_normal((4, 32)).astype(np.float32) * 3 + 1
    w, bb = rng.standard_normal(32).astype(np.float32), rng.standard_normal(32).astype(np.float32)
    y = np.empty_like(x)
    K.layernorm(y, x, w, bb, 1e-12)
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + 1e-12) * w + bb
    assert np.abs(y - ref).max() < 1e-5
    g = np.linspace(-8, 8, 64, dtype=np.float32)[None].copy()
    K.gelu(g)
    ref = [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in np.linspace(-8, 8, 64, dtype=np.float32).tolist()]
    assert np.abs(g[0] - np.array(ref)).max() < 1e-6
    # attention with two sequences vs a masked softmax reference
    H, hd, lengths = 2, 8, np.array([3, 5], np.int64)
    N = int(lengths.sum())
    qkv = rng.standard_normal((N, 3 * H * hd)).astype(np.float32)
    start = np.array([0, 3], np.int64)
    out = np.empty((N, H * hd), np.float32)
    K.attention_bidir(out, qkv, start, lengths, H, hd)
    D = H * hd
    for s0, n in zip(start, lengths, strict=True):
        for h in range(H):
            q = qkv[s0:s0 + n, h * hd:(h + 1) * hd].astype(np.float64)
            k = qkv[s0:s0 + n, D + h * hd:D + (h + 1) * hd].astype(np.float64)
            v = qkv[s0:s0 + n, 2 * D + h * hd:2 * D + (h + 1) * hd].astype(np.float64)
            s = q @ k.T / math.sqrt(hd)
            p = np.exp(s - s.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            assert np.abs(out[s0:s0 + n, h * hd:(h + 1) * hd] - p @ v).max() < 1e-5


# -- loading ------------------------------------------------------------------------------------------
def test_config_errors():
    good = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536,
            "vocab_size": 30522, "max_position_embeddings": 512, "model_type": "bert"}
    c = EncoderConfig.from_hf(good)
    assert (c.n_layer, c.n_embd, c.head_dim, c.n_types, c.eps) == (6, 384, 32, 2, 1e-12)
    with pytest.raises(ModelFormatError, match="missing config keys: num_hidden_layers, vocab_size"):
        EncoderConfig.from_hf({k: v for k, v in good.items() if k not in ("num_hidden_layers", "vocab_size")})
    with pytest.raises(ModelFormatError, match="model_type 'gpt2'"):
        EncoderConfig.from_hf({**good, "model_type": "gpt2"})
    with pytest.raises(ModelFormatError, match="hidden_act"):
        EncoderConfig.from_hf({**good, "hidden_act": "relu"})
    with pytest.raises(ModelFormatError, match="multiple"):
        EncoderConfig.from_hf({**good, "num_attention_heads": 7})


class _Wrapped:
    """A source view of another source with tensors dropped or replaced (name -> (ggml_type, bytes))."""

    def __init__(self, src, drop=(), replace=None):
        self.src, self.path, self.metadata = src, src.path, src.metadata
        self.replace = replace or {}
        self.tensors = {n: t for n, t in src.tensors.items() if n not in drop}
        for n, (gt, raw) in self.replace.items():
            t = src.tensors[n]
            self.tensors[n] = type(t)(n, int(gt), t.shape, 0, raw.size)

    def data(self, name):
        return self.replace[name][1] if name in self.replace else self.src.data(name)


def test_missing_tensor_is_named(enc):
    src = _Wrapped(enc.source, drop=("encoder.layer.3.intermediate.dense.bias",))
    with pytest.raises(ModelFormatError, match=r"'encoder\.layer\.3\.intermediate\.dense\.bias' is missing"):
        load_encoder_weights(src, enc.config)


def test_safetensors_bytes_match_library(enc):
    from safetensors import safe_open

    names = ["embeddings.LayerNorm.weight", "encoder.layer.5.output.dense.weight", "pooler.dense.bias"]
    with safe_open(str(enc.path / "model.safetensors"), framework="np") as f:
        for n in names:
            assert np.array_equal(np.asarray(enc.source.data(n)).view("<f4"), f.get_tensor(n).reshape(-1))
    assert "embeddings.position_ids" in enc.source.skipped


def test_quantized_matrices_path(enc, fx):
    """Q8_0 matrices (as an .apr may hold) run through the packed matmul3 path: close to HF, and still
    bit-identical between batch and one-by-one."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    rep = {}
    for n, t in enc.source.tensors.items():
        if n.startswith("encoder.layer.") and n.endswith(".weight") and len(t.shape) == 2:
            w = np.asarray(enc.source.data(n)).view("<f4").reshape(t.shape)
            rep[n] = (T.Q8_0, quants.quantize(w, T.Q8_0).reshape(-1))
    q = EncoderModel(enc.source, enc.config, enc.tokenizer, load_encoder_weights(_Wrapped(enc.source, replace=rep),
                                                                                 enc.config), enc.threads)
    assert q.weights.layers[0].qkv.w is None and len(q.weights.layers[0].qkv.packed) == 3
    meta, a = fx
    ids = _ids(fx)
    x, lengths = q.encode_ragged(ids)
    off, worst = 0, 0.0
    for i, n in enumerate(lengths):
        assert np.array_equal(x[off:off + n], q.encode_hidden(ids[i]))
        worst = max(worst, float(np.abs(x[off:off + n] - a[f"lhs_{i}"]).max()))
        off += n
    e = embed(q, meta["sentences"])
    cos = np.sum(e * np.stack([a[f"st_{i}"] for i in range(len(ids))]), axis=1)
    print(f"Q8_0 matrices: last_hidden_state max abs {worst:.3g}, min cosine {cos.min():.6f}")
    assert worst < 0.15 and cos.min() > 0.999


def test_apr_roundtrip(enc, fx, tmp_path):
    """An .apr made by ``apr-numba import`` from the HF directory gives bit-identical outputs."""
    apr_import = pytest.importorskip("apr_numba.formats.apr_import")
    out = tmp_path / "minilm.apr"
    apr_import.import_model(enc.path, out)
    m = load_encoder(out, threads=2)
    assert m.config == enc.config
    ids = _ids(fx)
    assert [x.tolist() for x in m.tokenize(fx[0]["sentences"])] == [x.tolist() for x in ids]
    assert np.array_equal(m.encode_ragged(ids)[0], enc.encode_ragged(ids)[0])


def test_not_an_encoder(tmp_path):
    bad = tmp_path / "x.bin"
    bad.write_bytes(b"NOPE" * 4)
    with pytest.raises(ModelFormatError, match="not an encoder model"):
        load_encoder(bad)
    d = tmp_path / "d"
    d.mkdir()
    with pytest.raises(ModelFormatError, match="config.json is missing"):
        load_encoder(d)


# -- CLI ----------------------------------------------------------------------------------------------
def test_cli_embed_json(enc, capsys):
    from apr_numba.cli.main import main

    assert main(["embed", "minilm-l6", "Hello world", "a", "--json", "-t", "2"]) == 0
    d = json.loads(capsys.readouterr().out)
    e = np.array(d["embeddings"], np.float32)
    assert e.shape == (2, 384) and d["dim"] == 384 and d["n_tokens"] == [4, 3] and d["normalized"]
    assert np.array_equal(e, embed(enc, ["Hello world", "a"]))
    assert main(["embed", "minilm-l6", "word " * 600, "--no-truncate"]) == 2
    assert "text 0 has 602 tokens" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["embed", "minilm-l6", "word " * 20, "--max-length", "8", "--pooling", "cls"]) == 0
    cap = capsys.readouterr()
    assert "truncated to 8" in cap.err and len(cap.out.split("\n")[0].split()) == 384
