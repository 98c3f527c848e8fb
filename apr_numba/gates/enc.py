"""ENC-001..004 on the BERT encoder (:class:`~apr_numba.encoder.model.EncoderModel`, default minilm-l6).

ENC-003's reference: ``apr_numba/gates/data/hf_minilm-l6_ref.npz`` (package data, 54 KB) holds HF
``BertModel``'s float32 ``last_hidden_state`` of three sentences of the test fixture
``tests/fixtures/hf_minilm-l6.npz`` (made by ``tests/fixtures/make_encoder_fixtures.py`` with torch and
transformers; provenance in the ``.json`` beside it). The gates cannot read ``tests/`` at run time, and a
float64 NumPy re-implementation would check the code against itself, not against HF; so the real HF numbers
ship with the package. Other encoders have no shipped reference: ENC-003 is NOT_APPLICABLE for them.
"""

from __future__ import annotations

import contextlib
import json
from importlib import resources

import numpy as np

from apr_numba.gates.core import Measured, NotApplicable

ENC002_RANGE = 10.0
REF_NPZ, REF_JSON = "hf_minilm-l6_ref.npz", "hf_minilm-l6_ref.json"


def _forward(enc, forward):
    return forward if forward is not None else enc.forward_embeddings


def enc_001(ctx, *, forward=None) -> Measured:
    """Layer count, hidden size and sequence length through ``forward_embeddings(x, capture_layers=True)`` for
    seq 1, 2, 7, 33 (unbatched) and a padded batch (2 x 9 with a mask): the captured stack has n_layer + 1 entries
    (input, then each layer, as the config's num_hidden_layers), every entry (seq, hidden_size), the output
    (seq, hidden_size); the weights hold n_layer layers; an empty sequence is refused. Value: violations.

    Injection: ``forward(x, attention_mask=None, capture_layers=False)`` replaces the encoder's.
    """
    enc = ctx.encoder
    fwd = _forward(enc, forward)
    c = enc.config
    rng = np.random.default_rng(1)
    bad = []
    if len(enc.weights.layers) != c.n_layer or enc.n_layer != c.n_layer:
        bad.append(f"{len(enc.weights.layers)} layers loaded, config says {c.n_layer}")
    for S in (1, 2, 7, 33):
        x = rng.uniform(-1, 1, (S, c.n_embd)).astype(np.float32)
        out, layers = fwd(x, capture_layers=True)
        if out.shape != (S, c.n_embd):
            bad.append(f"seq {S}: output {out.shape}")
        if layers.shape[0] != c.n_layer + 1:
            bad.append(f"seq {S}: {layers.shape[0] - 1} layer outputs, config says {c.n_layer}")
        bad += [f"seq {S}: layer {k} {a.shape}" for k, a in enumerate(layers) if a.shape != (S, c.n_embd)]
    xb = rng.uniform(-1, 1, (2, 9, c.n_embd)).astype(np.float32)
    mask = np.ones((2, 9), np.int64)
    mask[1, 5:] = 0
    ob = fwd(xb, attention_mask=mask)
    if ob.shape != xb.shape:
        bad.append(f"batch: output {ob.shape} for input {xb.shape}")
    try:
        fwd(np.zeros((0, c.n_embd), np.float32))
        bad.append("an empty sequence was accepted (seq_in must be > 0)")
    except Exception:  # noqa: BLE001 - any refusal is right
        pass
    return Measured(float(len(bad)), detail=(
        f"{c.n_layer} layers, hidden {c.n_embd}; seq 1, 2, 7, 33 and a masked 2x9 batch" +
        (f"; {'; '.join(bad[:3])}" if bad else "; every shape preserved")), data={"violations": bad})


def enc_002(ctx, *, forward=None) -> Measured:
    """Finiteness for inputs in [-10, 10]: the layer stack on embeddings drawn uniformly from [-10, 10] (4 seeds,
    seq 1..64) and on the extremes (all +10, all -10, alternating +-10 by position and by feature). Value:
    non-finite output elements.

    Injection: ``forward`` replaces ``forward_embeddings``.
    """
    enc = ctx.encoder
    fwd = _forward(enc, forward)
    D = enc.config.n_embd
    R = ENC002_RANGE
    rng = np.random.default_rng(2)
    inputs = [rng.uniform(-R, R, (S, D)).astype(np.float32) for S in (1, 5, 17, 64)]
    inputs += [np.full((8, D), R, np.float32), np.full((8, D), -R, np.float32),
               np.where(np.arange(8)[:, None] % 2 == 0, R, -R).astype(np.float32) * np.ones((1, D), np.float32),
               np.where(np.arange(D)[None, :] % 2 == 0, R, -R).astype(np.float32) * np.ones((8, 1), np.float32)]
    n = total = 0
    for x in inputs:
        out = np.asarray(fwd(x))
        n += int((~np.isfinite(out)).sum())
        total += out.size
    return Measured(float(n), detail=f"{len(inputs)} inputs in [-{R:g}, {R:g}], {total} outputs, {n} non-finite",
                    data={"elements": total, "nonfinite": n})


def reference() -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata, arrays) of the shipped HF reference (see the module docstring)."""
    base = resources.files("apr_numba.gates") / "data"
    meta = json.loads((base / REF_JSON).read_text(encoding="utf-8"))
    with (base / REF_NPZ).open("rb") as fh, np.load(fh) as z:
        arrays = {k: z[k] for k in z.files}
    return meta, arrays


@contextlib.contextmanager
def perturbed_weight(enc, layer: int = 0, delta: float = 0.05):
    """Temporarily add ``delta`` to one weight of layer ``layer``'s attention output projection (restored on exit).
    The falsification hook of ENC-003."""
    d = enc.weights.layers[layer].o
    arr = d.w if d.w is not None else d.packed[0].s
    idx = (0,) * arr.ndim
    old = arr[idx]
    arr[idx] = old + np.float32(delta)
    try:
        yield
    finally:
        arr[idx] = old


def enc_003(ctx, *, perturb: float | None = None) -> Measured:
    """Max |encoder last_hidden_state - HF BertModel last_hidden_state| over the shipped reference sentences (token
    ids as HF tokenized them), for all-MiniLM-L6-v2.

    Injection: ``perturb`` adds that much to one weight of layer 0 (attention output) during the measurement.
    """
    enc = ctx.encoder
    try:
        meta, ref = reference()
    except FileNotFoundError as exc:  # a build without the package data
        raise NotApplicable(f"the HF reference data is not installed ({exc})") from None
    c = enc.config
    name = str(enc.path).lower()
    if not ("minilm-l6" in name and (c.n_layer, c.n_embd) == (meta["n_layer"], meta["hidden"])):
        raise NotApplicable(f"no HF reference shipped for {enc.path.name} (only {meta['model_dir']})")
    keys = sorted(k[4:] for k in ref if k.startswith("ids_"))
    worst = 0.0
    per = {}
    with perturbed_weight(enc, 0, perturb) if perturb else contextlib.nullcontext():
        for k in keys:
            h = enc.encode_hidden(ref[f"ids_{k}"].astype(np.int64))
            err = float(np.abs(h.astype(np.float64) - ref[f"lhs_{k}"]).max())
            per[meta["sentences"].get(k, k)] = err
            worst = max(worst, err)
    return Measured(worst, detail=(f"{len(keys)} sentences vs HF transformers {meta['transformers']} (torch "
                                   f"{meta['torch']}) last_hidden_state"), data={"per_sentence": per})


CLS_TEXTS = ("The quick brown fox jumps over the lazy dog.", "a", "Embeddings: [CLS] pooling vs. mean pooling (n=3).")


def enc_004(ctx, *, pooling: str = "cls") -> Measured:
    """``apr_numba.embed(encoder, texts, pooling="cls", normalize=False)`` (one ragged batch of 3 texts) against
    row 0 of ``encode_hidden`` of each text alone, compared as float32 bit patterns. Value: differing elements.

    Injection: ``pooling`` ("mean" in place of CLS).
    """
    from apr_numba.encoder.embedding import embed

    enc = ctx.encoder
    emb = embed(enc, list(CLS_TEXTS), pooling=pooling, normalize=False)
    ids = enc.tokenize(list(CLS_TEXTS))
    diff = 0
    for i, x in enumerate(ids):
        row0 = enc.encode_hidden(x)[0]
        diff += int((emb[i].view(np.uint32) != row0.view(np.uint32)).sum())
    return Measured(float(diff), detail=f"{len(CLS_TEXTS)} texts, {emb.size} elements, {diff} differ in their bits",
                    data={"elements": int(emb.size), "differing": diff, "pooling": pooling})
