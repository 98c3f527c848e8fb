"""Bisection on the CPU names the stage where a teaching fault enters, on every tiny architecture (issue 13).

For each committed fixture (tests/fixtures/arch/*.gguf: llama SentencePiece, Llama-3 with ``rope_freqs``, qwen3,
qwen3moe, gemma3), each forward teaching fault (apr_numba/arch/faults.py ``FLAG_FAULTS``) is injected at the
middle layer of the Numba CPU forward and compared with the clean float64 reference trace of the same tokens.
Bisection must name (middle layer, ``FAULTS[f].enters``), the fault's own definition of where it enters, when
the fault applies to the architecture, and nothing when it cannot change anything there. Whether it applies is
decided from facts independent of the engine:

* ``qkv-bias-drop``: the GGUF (read with gguf-py) holds ``blk.N.attn_q.bias``; none of these files do;
* ``gqa-map``: HF's ``num_key_value_heads`` > 1 (with one KV head, every query head already reads head 0);
* ``ffn-swap``: the block has a dense gated FFN (``blk.N.ffn_gate.weight``); a MoE block has experts instead;
* ``softmax-no-max``: some float64 reference score of the layer exceeds ln(65504) (else the fault is latent: no
  score of these fixtures comes near it, so it is also shown on tests/tiny_arch.py files with large scores);
* ``rope-theta``: always (the wrong base differs from the layer's own, whatever the layer's base is).

``q4k-scale`` (a weight fault) needs a 4-bit matrix; these files are Q8_0, so it must be refused clearly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from apr_numba.arch.faults import FAULTS, FLAG_FAULTS
from apr_numba.debug.bisection import compare_traces, format_bisect
from apr_numba.debug.tracing import trace
from apr_numba.errors import ArgumentError
from apr_numba.model.decoder import load

ARCH = Path(__file__).resolve().parent / "fixtures" / "arch"
NAMES = sorted(p.name[: -len("_ref.json")] for p in ARCH.glob("*_ref.json"))
LN_F16_MAX = math.log(65504.0)
_CACHE: dict = {}


def fixture(name: str):
    """(meta json, CPU model, gguf-py tensor names, prompt ids, clean reference trace), once per session."""
    if name not in _CACHE:
        meta = json.loads((ARCH / f"{name}_ref.json").read_text(encoding="utf-8"))
        path = ARCH / meta["gguf_file"]
        m = load(path, backend="cpu", n_ctx=128, warmup=False)
        names = {t.name for t in GGUFReader(str(path)).tensors}
        ids = [int(t) for t in np.load(ARCH / f"{name}_ref.npz")["prompt_ids_4"]]  # 41 tokens: > gemma3's window
        _CACHE[name] = meta, m, names, ids, trace(m, tokens=ids, backend="reference")
    return _CACHE[name]


def expected(name: str, fault: str):
    """(layer, stage) bisection must name for ``fault`` at the middle layer, or None where it cannot show."""
    meta, _, names, _, ref = fixture(name)
    layer = meta["n_layer"] // 2
    if fault == "qkv-bias-drop" and f"blk.{layer}.attn_q.bias" not in names:
        return None
    if fault == "gqa-map" and meta["hf_config"]["num_key_value_heads"] == 1:
        return None
    if fault == "ffn-swap" and f"blk.{layer}.ffn_gate.weight" not in names:
        return None
    if fault == "softmax-no-max":
        top = float(ref.get("attn_scores", layer).max())
        assert abs(top - LN_F16_MAX) > 0.5, f"score {top} too close to the float16 overflow point"
        if top < LN_F16_MAX:
            return None
    return layer, FAULTS[fault].enters


GRID = [pytest.param(n, f, id=f"{n}-{f}") for n in NAMES for f in FLAG_FAULTS]


def test_every_architecture_has_a_fixture():
    assert {json.loads((ARCH / f"{n}_ref.json").read_text())["general.architecture"] for n in NAMES} >= {
        "llama", "qwen3", "qwen3moe", "gemma3"}


@pytest.mark.parametrize("name,fault", GRID)
def test_cpu_bisect_names_the_stage_where_the_fault_enters(name, fault):
    meta, m, _, ids, ref = fixture(name)
    layer = meta["n_layer"] // 2
    spec = f"{fault}@{layer}"
    res = compare_traces(trace(m, tokens=ids, inject=spec), ref, model=name, a="cpu", b="reference", inject=spec,
                         config=m.config, source=m.source)
    want = expected(name, fault)
    got = None if res.index is None else (res.layer, res.stage)
    assert got == want, format_bisect(res)
    if fault == "softmax-no-max" and want is None:  # latent for this input: the plan cannot know the scores
        assert res.expected == (layer, FAULTS[fault].enters) and "latent" in format_bisect(res)
    else:
        assert res.expected == want, f"the fault plan expects {res.expected}"  # it knows where (and whether)
    if want is not None:
        assert res.layer == layer  # the fault's layer is the one named, not a later one
        prev = res.rows[res.index - 1]
        assert prev.holds and prev.cosine >= 0.999
        assert all(r.holds for r in res.rows[:res.index])


@pytest.mark.parametrize("name", NAMES)
def test_cpu_bisect_names_nothing_without_a_fault(name):
    _, m, _, ids, ref = fixture(name)
    res = compare_traces(trace(m, tokens=ids), ref)
    assert not res.diverged and all(r.holds for r in res.rows), format_bisect(res)
    assert min(r.cosine for r in res.rows) >= 0.9999
    assert {k[1] for k in ref.tensors} >= set(m.spec.block_stages())  # every stage of the block was compared


@pytest.mark.parametrize("name", NAMES)
def test_weight_fault_needs_a_4bit_matrix(name):
    _, m, _, ids, _ = fixture(name)
    with pytest.raises(ArgumentError, match="4-bit"):
        trace(m, tokens=ids, inject="q4k-scale@0")


@pytest.mark.parametrize("name,fault", GRID)
def test_the_fault_means_the_same_on_the_reference(name, fault):
    """The fault injected on both sides (CPU and float64 reference): every stage up to the faulty layer agrees."""
    meta, m, _, ids, ref = fixture(name)
    layer = meta["n_layer"] // 2
    kw = dict(tokens=ids, layers=f"0..{layer}", inject=f"{fault}@{layer}")
    cpu, fref = trace(m, **kw), trace(m, backend="reference", **kw)
    res = compare_traces(cpu, fref)
    assert not res.diverged, format_bisect(res)
    if expected(name, fault) is not None:  # and the fault did change the reference's own trace
        assert any(not np.array_equal(fref.tensors[k], ref.tensors[k]) for k in fref.tensors if k[0] == layer)


@pytest.mark.parametrize("arch", ["gemma3", "qwen3", "qwen3moe", "llama"])
def test_softmax_overflow_is_named_where_scores_are_large(tmp_path, arch):
    """softmax-no-max, latent on the fixtures, on a tiny file of each architecture whose Q/K weights (and QK-norm
    weights) are scaled by 4 so that scores exceed ln(65504)."""
    from tests.tiny_arch import write_arch_gguf

    p = tmp_path / f"{arch}.gguf"
    write_arch_gguf(p, arch, window=4 if arch == "gemma3" else 0, qk_gain=4.0)
    m = load(p, backend="cpu", n_ctx=32, warmup=False)
    ids = [3, 77, 120, 5, 9, 250, 41, 66, 8, 12, 199, 30]
    ref = trace(m, tokens=ids, backend="reference")
    top = float(ref.get("attn_scores", 1).max())
    assert top > LN_F16_MAX + 0.5, top  # the fault can show at layer 1
    res = compare_traces(trace(m, tokens=ids, inject="softmax-no-max@1"), ref, inject="softmax-no-max@1",
                         config=m.config, source=m.source)
    assert (res.layer, res.stage) == (1, FAULTS["softmax-no-max"].enters) == res.expected, format_bisect(res)


def test_bisect_walks_a_moe_block_in_compute_order():
    """A wrong router (its logits, hence the chosen experts and everything after them) is named at moe_router, not
    at ffn_out, which aprender's stage enum lists before the MoE stages (Qwen3MoeSparseMoeBlock computes router
    logits, top-k, experts, in that order, after post_attention_layernorm)."""
    meta, m, _, ids, ref = fixture("qwen3moe")
    cpu = trace(m, tokens=ids)
    order = [s for la, s in cpu.keys() if la == 1]
    assert order.index("ffn_norm") < order.index("moe_router") < order.index("moe_router_indices") \
        < order.index("moe_ffn_out") < order.index("ffn_out") < order.index("post_ffn_residual")
    for stage in ("moe_router", "moe_router_indices", "moe_ffn_out", "ffn_out", "post_ffn_residual"):
        cpu.tensors[(1, stage)] = -cpu.tensors[(1, stage)] - 1.0  # everything from the router on is wrong
    res = compare_traces(cpu, ref)
    assert (res.layer, res.stage) == (1, "moe_router"), format_bisect(res)
