"""Stage bisection and teaching faults (issue 5).

For every fault, on both models, at layer 0 and at a middle layer, bisection (CPU with the fault vs the
clean float64 reference) must name the stage where the fault enters, and nothing without a fault. The
reference trace is made once per model (tests/trace_testlib.py) and reused for every fault.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from apr_numba.arch.faults import FLAG_FAULTS as FORWARD_FAULTS
from apr_numba.cli.main import main
from apr_numba.debug.bisection import bisect, compare_traces, format_bisect
from apr_numba.debug.faults import FAULT_NAMES, FAULTS, corrupted_codes, parse_fault, plan_fault, q4k_scale_bug
from apr_numba.debug.tracing import parse_stages, trace
from apr_numba.errors import ArgumentError
from apr_numba.quants.layouts import decode_codes
from tests.trace_testlib import LN_F16_MAX, MID, MODELS, PROMPT, model, opencl_missing, reference_dir, reference_trace

QWEN, SMOL = "qwen2.5-coder-0.5b", "smollm2-135m"
QWEN_Q4K_LAYERS = (2, 4, 5, 11, 12, 14, 15, 17, 18, 20, 22, 23)  # ffn_down only

# where each fault enters (the stage bisection must name), from docs/bisection-tutorial.md
ENTERS = {"rope-theta": "q_post_rope", "rope-style": "q_post_rope", "attn-scale": "attn_scores",
          "causal-mask-off": "attn_softmax", "gqa-map": "attn_scores", "qkv-bias-drop": "qkv_bias",
          "softmax-no-max": "attn_softmax", "ffn-swap": "ffn_gate", "rmsnorm-eps": "attn_norm"}


def expected(name: str, fault: str, layer: int):
    """(layer, stage) bisection must name, or None."""
    if fault == "qkv-bias-drop" and name == SMOL:
        return None  # Llama has no QKV bias: the fault is a no-op
    if fault == "q4k-scale":
        if name == SMOL:
            return layer, "qkv_matmul"  # emulated on attn_q, the layer's first 4-bit matrix
        return min(QWEN_Q4K_LAYERS, key=lambda la: (abs(la - layer), la)), "ffn_out"
    if fault == "softmax-no-max":
        top = float(reference_trace(name).get("attn_scores", layer).max())
        assert abs(top - LN_F16_MAX) > 1.0, f"score {top} too close to the float16 overflow point"
        if top < LN_F16_MAX:
            return None  # no score overflows float16 here: the fault is latent, nothing to find
    return layer, ENTERS[fault]


GRID = [pytest.param(name, fault, layer, id=f"{name}-{fault}@{layer}")
        for name in MODELS for fault in FAULT_NAMES for layer in (0, MID[name])]


@pytest.mark.parametrize("name,fault,layer", GRID)
def test_bisect_names_the_stage_where_the_fault_enters(name, fault, layer):
    m = model(name)
    ref = reference_trace(name)
    spec = f"{fault}@{layer}"
    cpu = trace(m, tokens=ref.tokens, inject=spec)
    res = compare_traces(cpu, ref, model=name, a="cpu", b="reference", inject=spec, config=m.config,
                         source=m.source)
    want = expected(name, fault, layer)
    got = None if res.index is None else (res.layer, res.stage)
    assert got == want, format_bisect(res)
    if fault != "softmax-no-max":  # (latent on SmolLM2 layer 0: no score above ln 65504)
        assert res.expected == want  # the plan knows where its fault enters
    if want is not None:
        prev = res.rows[res.index - 1]
        assert prev.holds and prev.cosine >= 0.999
        assert res.index == next(i for i, r in enumerate(res.rows) if not r.holds)


@pytest.mark.parametrize("name,fault,layer", GRID)
def test_bisect_finds_faults_injected_on_opencl(name, fault, layer):
    """The same faults on the OpenCL backend (PoCL here): A = opencl with the fault, B = clean reference."""
    why = opencl_missing()
    if why:
        pytest.skip(why)
    m, ref = model(name), reference_trace(name)
    res = compare_traces(trace(m, tokens=ref.tokens, backend="opencl", inject=f"{fault}@{layer}"), ref)
    got = None if res.index is None else (res.layer, res.stage)
    assert got == expected(name, fault, layer), format_bisect(res)


@pytest.mark.parametrize("name", MODELS)
def test_bisect_names_nothing_without_a_fault(name):
    m = model(name)
    ref = reference_trace(name)
    res = compare_traces(trace(m, tokens=ref.tokens), ref)
    assert not res.diverged and res.stage is None and all(r.holds for r in res.rows)
    assert min(r.cosine for r in res.rows) >= 0.99999
    assert len(res.rows) == len(ref.tensors)
    assert "no divergence" in format_bisect(res)


def test_cosine_only_rule_blames_the_softmax_for_a_pure_rescale():
    """aprender's cosine-only rule cannot see attn-scale (scores x 8 keep their cosine)."""
    m, ref = model(SMOL), reference_trace(SMOL)
    cpu = trace(m, tokens=ref.tokens, inject="attn-scale@0")
    res = compare_traces(cpu, ref, cosine_only=True)
    assert (res.layer, res.stage) == (0, "attn_softmax")
    assert res.cosine("attn_scores", 0) > 0.999999
    assert compare_traces(cpu, ref).rows[res.index - 1].norm_ratio == pytest.approx(8.0, rel=1e-5)


def test_a_fault_in_every_layer_is_found_in_layer_0():
    m, ref = model(SMOL), reference_trace(SMOL)
    res = compare_traces(trace(m, tokens=ref.tokens, inject="gqa-map"), ref)
    assert (res.layer, res.stage) == (0, "attn_scores")


FAULT_ON_REFERENCE = [(SMOL, f, 0) for f in FAULT_NAMES] + [(QWEN, "qkv-bias-drop", 0),
                                                            (QWEN, "softmax-no-max", 0), (QWEN, "q4k-scale", 0)]


@pytest.mark.parametrize("name,fault,layer", FAULT_ON_REFERENCE,
                         ids=[f"{n}-{f}@{la}" for n, f, la in FAULT_ON_REFERENCE])
def test_faults_mean_the_same_on_the_reference(name, fault, layer):
    """The same fault on the CPU and on the float64 reference: every stage up to the faulty layer agrees."""
    m = model(name)
    spec = f"{fault}@{layer}"
    plan = plan_fault(spec, m.config, m.source)
    last = plan.first_layer if plan.first_layer is not None else layer
    stages = [s for s in parse_stages("all") if s not in ("final_norm", "lm_head")]
    kw = dict(tokens=m.encode(PROMPT), stages=stages, layers=f"0..{last}", inject=spec)
    cpu, ref = trace(m, **kw), trace(m, backend="reference", **kw)
    res = compare_traces(cpu, ref)
    assert not res.diverged, format_bisect(res, full=True)
    if expected(name, fault, layer) is not None:  # and the fault did change something (unless latent / no-op)
        clean = reference_trace(name)
        assert any(not np.array_equal(ref.tensors[k], clean.tensors[k]) for k in ref.tensors
                   if k[0] == last), fault


def test_bisect_api_end_to_end_against_a_trace_folder(tmp_path_factory):
    d = reference_dir(SMOL, tmp_path_factory)
    res = bisect(model(SMOL), PROMPT, a="cpu", b=d, inject="ffn-swap@4")
    assert (res.layer, res.stage) == (4, "ffn_gate") and res.expected == (4, "ffn_gate")
    assert res.b == d and res.inject == "ffn-swap@4" and res.threshold == 0.999
    win = res.window()
    assert win[len(win) // 2].stage == "ffn_gate" and len(win) == 7
    js = json.loads(json.dumps(res.to_dict()))
    assert js["stage"] == "ffn_gate" and js["layer"] == 4 and js["diverged"] is True
    assert len(js["rows"]) == len(res.rows)
    clean = bisect(model(SMOL), a="cpu", b=d)  # tokens from the folder's trace.json
    assert not clean.diverged and clean.tokens == reference_trace(SMOL).tokens


def test_cli_bisect_exit_codes_and_table(tmp_path_factory, capsys):
    d = reference_dir(SMOL, tmp_path_factory)
    rc = main(["bisect", SMOL, "-p", PROMPT, "--a", "cpu", "--b", d, "--inject", "rope-style@3"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "first divergence: layer 3, stage q_post_rope" in out and "llama.cpp Qcur" in out
    assert "fault enters at layer 3, q_post_rope: found" in out
    table = [ln for ln in out.splitlines() if ln.lstrip().startswith(">")]
    assert len(table) == 1 and "q_post_rope" in table[0]
    assert main(["bisect", SMOL, "-p", PROMPT, "--b", d]) == 0
    assert "no divergence" in capsys.readouterr().out
    assert main(["bisect", SMOL, "-p", PROMPT, "--b", d, "--inject", "qkv-bias-drop@2", "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["diverged"] is False and any("no-op" in n for n in js["notes"])
    assert main(["bisect", SMOL, "-p", "hello", "--b", d]) == 2  # the folder was traced from other tokens
    assert "other tokens" in capsys.readouterr().err
    assert main(["bisect", SMOL, "-p", PROMPT, "--b", d, "--inject", "nope"]) == 2
    assert "unknown fault" in capsys.readouterr().err


def test_fault_parsing_and_plans():
    assert parse_fault("rope-theta") == ("rope-theta", None)
    assert parse_fault(" FFN_SWAP@3 ") == ("ffn-swap", 3)
    assert parse_fault("gqa-map@all") == ("gqa-map", None)
    for bad, msg in (("nope@1", "unknown fault"), ("ffn-swap@x", "layer number"), ("", "empty")):
        with pytest.raises(ArgumentError, match=msg):
            parse_fault(bad)
    m = model(SMOL)
    with pytest.raises(ArgumentError, match="out of range"):
        plan_fault("ffn-swap@30", m.config, m.source)
    assert set(FORWARD_FAULTS) | {"q4k-scale"} == set(FAULTS) == set(FAULT_NAMES)
    for f in FAULTS.values():
        assert f.what and f.history and f.enters
    p = plan_fault("rope-theta@1", m.config, m.source)
    assert p.rope_theta_alt == 10000.0 and p.flag_table(30)[1].sum() == 1 and p.flag_table(30).sum() == 1
    pq = plan_fault("q4k-scale@0", model(QWEN).config, model(QWEN).source)
    assert pq.matrices == [(2, "ffn_down")] and "nearest layer" in pq.notes[0]
    assert plan_fault("rope-theta", model(QWEN).config).rope_theta_alt == 10000.0
    ps = plan_fault("q4k-scale@5", m.config, m.source)
    assert ps.matrices == [(5, "attn_q")] and "emulated" in ps.notes[0]
    with pytest.raises(ArgumentError, match="threshold"):
        bisect(m, PROMPT, threshold=1.5)


def test_q4k_scale_bug_changes_only_sub_blocks_4_to_7():
    m = model(QWEN)
    name = "blk.12.ffn_down.weight"
    t = m.source.tensors[name]
    raw = m.source.data(name)
    good = decode_codes(t.ggml_type, raw, tuple(t.shape), name)
    bad = corrupted_codes(t.ggml_type, raw, tuple(t.shape), name)
    assert np.array_equal(good.codes, bad.codes)
    s_good = good.scale.reshape(good.scale.shape[0], -1, 8)
    s_bad = bad.scale.reshape(bad.scale.shape[0], -1, 8)
    assert np.array_equal(s_good[..., :4], s_bad[..., :4])
    changed = (s_good[..., 4:] != s_bad[..., 4:]).mean()
    assert 0.2 < changed < 1.0 and (s_bad[..., 4:] <= s_good[..., 4:] + 1e-12).all()  # high bits dropped
    assert math.isfinite(float(bad.dequantize().sum()))
    ref = q4k_scale_bug(good, raw)  # the buggy decoder, written out, gives the same weights
    assert np.array_equal(ref.scale, bad.scale) and np.array_equal(ref.offset, bad.offset)


def test_emulated_scale_bug_on_q4_1_touches_only_blocks_4_to_7():
    m = model(SMOL)
    name = "blk.3.attn_q.weight"
    t = m.source.tensors[name]
    raw = m.source.data(name)
    good = decode_codes(t.ggml_type, raw, tuple(t.shape), name)
    bad = corrupted_codes(t.ggml_type, raw, tuple(t.shape), name)
    assert np.array_equal(good.codes, bad.codes)
    sub = np.arange(good.scale.shape[1]) % 8 >= 4
    assert np.array_equal(good.scale[:, ~sub], bad.scale[:, ~sub])
    assert np.array_equal(good.offset[:, ~sub], bad.offset[:, ~sub])
    assert (good.scale[:, sub] != bad.scale[:, sub]).mean() > 0.5
