"""Tensor tracing (issue 5): stage names and parsing, APRT files, capture on the CPU and the reference,
read-only capture (byte-identical greedy tokens), and ``apr-numba diff`` / ``trace``.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from apr_numba.arch.stages import ALIASES, MOE_STAGES, STAGES, WHOLE_MODEL_STAGES
from apr_numba.cli.main import main
from apr_numba.debug.bisection import compare_traces
from apr_numba.debug.stage_diff import (
    DIFF_JSON_SCHEMA,
    SCHEMA,
    cosine,
    diff_arrays,
    diff_files,
    diff_traces,
    validate_diff_json,
)
from apr_numba.debug.tracing import (
    SaveTensorStage,
    Trace,
    parse_layers,
    parse_stages,
    read_aprt,
    stage_path,
    trace,
    trace_table,
    wanted_keys,
    write_aprt,
)
from apr_numba.errors import ArgumentError, ModelFormatError
from tests.trace_testlib import MODELS, PROMPT, model, opencl_missing, reference_trace

# -- stages ------------------------------------------------------------------------------------


def test_stage_enum_is_the_canonical_list_with_llama_cpp_and_hf_names():
    assert tuple(s.value for s in SaveTensorStage) == STAGES
    assert ALIASES == {"layer_output": "post_ffn_residual"}
    for s in SaveTensorStage:
        assert "llama.cpp:" in s.__doc__ and "HF:" in s.__doc__, s
        assert s.llama_cpp and s.hf
    named = " ".join(s.llama_cpp for s in SaveTensorStage)
    for g in ("attn_norm", "Qcur", "Kcur", "kq ", "kq_soft_max", "kqv", "kqv_out", "ffn_inp", "ffn_norm",
              "ffn_gate", "ffn_swiglu", "ffn_out", "l_out", "result_norm", "result_output"):
        assert g.strip() in named, g
    assert "after the final norm" in SaveTensorStage.FINAL_NORM.hf


def test_parse_stages():
    assert parse_stages("all") == [s for s in STAGES if s not in MOE_STAGES]
    assert parse_stages("all", moe=True) == list(STAGES)
    assert parse_stages(" LM_HEAD , Attn_Norm,layer_output ") == ["attn_norm", "post_ffn_residual", "lm_head"]
    assert parse_stages("attn_softmax,attn_scores,attn_scores") == ["attn_scores", "attn_softmax"]
    for bad in ("", "attn_norm,", ",attn_norm", "attn_norm,,lm_head", " "):
        with pytest.raises(ArgumentError, match="empty stage"):
            parse_stages(bad)
    with pytest.raises(ArgumentError, match="unknown stage 'attn_nrm'"):
        parse_stages("attn_nrm")
    with pytest.raises(ArgumentError, match="mixture-of-experts"):
        parse_stages("moe_router", moe=False, model_desc="x")
    assert parse_stages("moe_router", moe=True) == ["moe_router"]


def test_parse_layers():
    assert parse_layers(None, 4) == [0, 1, 2, 3]
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("1..2", 4) == [1, 2]
    assert parse_layers("1..=3", 4) == [1, 2, 3]
    assert parse_layers("0,2..3", 4) == [0, 2, 3]
    assert parse_layers("..1", 4) == [0, 1]
    assert parse_layers(2, 4) == [2]
    for bad, msg in (("4", "out of range"), ("2..1", "empty layer range"), ("a..b", "bad layer"), ("x", "bad")):
        with pytest.raises(ArgumentError, match=msg):
            parse_layers(bad, 4)


def test_moe_stage_on_a_dense_model_is_a_clear_error():
    with pytest.raises(ArgumentError, match="moe_router.*mixture-of-experts.*dense"):
        trace(model("smollm2-135m"), "hi", stages="moe_router")


# -- APRT files --------------------------------------------------------------------------------


def test_aprt_round_trip_keeps_nan_bits(tmp_path):
    bits = np.array([0x7FC00000, 0x7FC00123, 0xFFC00001, 0x7F800000, 0xFF800000, 0x80000000, 0x3F800000],
                    np.uint32)
    a = np.concatenate([bits.view(np.float32), np.random.default_rng(0).standard_normal(100).astype(np.float32)])
    p = write_aprt(tmp_path / "x" / "s.bin", a, 7)
    raw = p.read_bytes()
    assert raw[:4] == b"APRT" and struct.unpack("<II", raw[4:12]) == (7, a.size) and len(raw) == 12 + 4 * a.size
    layer, b = read_aprt(p)
    assert layer == 7 and b.dtype == np.float32 and np.array_equal(b.view(np.uint32), a.view(np.uint32))
    q = write_aprt(tmp_path / "w.bin", np.ones((2, 3)), None)
    assert q.read_bytes()[4:8] == b"\xff\xff\xff\xff"
    assert read_aprt(q)[0] is None and read_aprt(q)[1].tolist() == [1.0] * 6


def test_aprt_rejects_bad_files(tmp_path):
    (tmp_path / "gguf.bin").write_bytes(b"GGUF" + bytes(20))
    with pytest.raises(ModelFormatError, match="not an APRT tensor file"):
        read_aprt(tmp_path / "gguf.bin")
    p = write_aprt(tmp_path / "t.bin", np.arange(10), 0)
    (tmp_path / "short.bin").write_bytes(p.read_bytes()[:-4])
    with pytest.raises(ModelFormatError, match="10 float32 values"):
        read_aprt(tmp_path / "short.bin")
    (tmp_path / "tiny.bin").write_bytes(b"APR")
    with pytest.raises(ModelFormatError, match="not an APRT"):
        read_aprt(tmp_path / "tiny.bin")


# -- capture -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_cpu_trace_shapes_and_stage_semantics(name):
    m = model(name)
    c = m.config
    tr = trace(m, PROMPT)
    T = len(tr.tokens)
    assert T >= 2
    keys = tr.keys()
    assert keys[0] == (0, "embedding") and keys[-2:] == [(None, "final_norm"), (None, "lm_head")]
    assert len(keys) == 1 + c.n_layer * (len(STAGES) - len(MOE_STAGES) - 3) + 2
    width = {"qkv_matmul": c.q_dim + 2 * c.kv_dim, "qkv_bias": c.q_dim + 2 * c.kv_dim, "q_post_rope": c.q_dim,
             "k_post_rope": c.kv_dim, "attention": c.q_dim, "ffn_gate": c.n_ff, "ffn_up": c.n_ff,
             "ffn_silu": c.n_ff, "ffn_swigl": c.n_ff, "lm_head": c.n_vocab}
    for (_, stage), a in tr.tensors.items():
        want = (c.n_head, T, T) if stage in ("attn_scores", "attn_softmax") else (T, width.get(stage, c.n_embd))
        assert a.shape == want and a.dtype == np.float32, stage
    L = 1
    sc, pr = tr.get("attn_scores", L), tr.get("attn_softmax", L)
    upper = np.triu(np.ones((T, T), bool), 1)
    assert (sc[:, upper] == 0).all() and (pr[:, upper] == 0).all()
    np.testing.assert_allclose(pr.sum(-1), 1.0, atol=1e-5)
    g, u = tr.get("ffn_gate", L).astype(np.float64), tr.get("ffn_up", L)
    np.testing.assert_allclose(tr.get("ffn_silu", L), g / (1 + np.exp(-g)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tr.get("ffn_swigl", L), tr.get("ffn_silu", L) * u, rtol=1e-5, atol=1e-6)
    bias = tr.get("qkv_bias", L) - tr.get("qkv_matmul", L)
    np.testing.assert_allclose(bias, np.broadcast_to(m.weights.bias_qkv[L], bias.shape), atol=1e-5)
    np.testing.assert_array_equal(tr.get("post_attn_residual", L), tr.get("post_ffn_residual", L - 1)
                                  + tr.get("attn_out", L))
    # block outputs and logits equal the untraced forward's (capture only copies): the traceable forward with a
    # fresh (empty) trace table; untraced short calls run the worker decode, equal to float32 rounding
    logits = np.empty((T, c.n_vocab), np.float32)
    layer_out = np.empty((c.n_layer, T, c.n_embd), np.float32)
    m.forward_into(np.asarray(tr.tokens, np.int64), logits, layer_out, m.new_state(64, cpu=True), m.debug_args())
    np.testing.assert_array_equal(np.stack([tr.get("layer_output", la) for la in range(c.n_layer)]), layer_out)
    np.testing.assert_array_equal(tr.get("lm_head"), logits)


@pytest.mark.parametrize("name", MODELS)
def test_cpu_and_reference_agree_on_every_stage(name):
    cpu, ref = trace(model(name), PROMPT), reference_trace(name)
    assert cpu.tokens == ref.tokens and set(cpu.tensors) == set(ref.tensors)
    worst = min((cosine(cpu.tensors[k], ref.tensors[k]), k) for k in cpu.keys())
    assert worst[0] >= 0.99999, worst
    for k in cpu.keys():
        a, b = cpu.tensors[k].astype(np.float64), ref.tensors[k].astype(np.float64)
        assert abs(np.linalg.norm(a) / np.linalg.norm(b) - 1) < 1e-4, k


def test_reference_trace_of_early_layers_stops_early():
    m = model("smollm2-135m")
    part = trace(m, PROMPT, stages="attn_norm,attn_softmax,layer_output", layers="0..1", backend="reference")
    full = reference_trace("smollm2-135m")
    assert set(part.tensors) == {(la, s) for la in (0, 1) for s in ("attn_norm", "attn_softmax",
                                                                     "post_ffn_residual")}
    for k, a in part.tensors.items():
        np.testing.assert_array_equal(a, full.tensors[k])


def test_trace_subset_and_attention_pair():
    m = model("smollm2-135m")
    tr = trace(m, PROMPT, stages="attn_scores", layers="3")
    assert list(tr.tensors) == [(3, "attn_scores")]  # attn_softmax captured alongside but not returned
    off, buf, where = trace_table(m.config, wanted_keys(["attn_scores"], [3]), 5)
    assert (off >= 0).sum() == 2 and buf.size == 2 * m.config.n_head * 25
    with pytest.raises(ArgumentError, match="embedding stage is layer 0"):
        trace(m, PROMPT, stages="embedding", layers="2")
    with pytest.raises(ArgumentError, match="unknown trace backend"):
        trace(m, PROMPT, backend="cuda")


def _greedy(m, ids, n, capture: bool):
    """Greedy decoding on the CPU forward; with ``capture`` every stage of every layer is traced at every
    step (prefill and decode). Returns (token ids, every step's logits)."""
    c = m.config
    state = m.new_state(64, cpu=True)
    keys = wanted_keys(parse_stages("all"), list(range(c.n_layer)))
    toks, out, all_logits = np.asarray(ids, np.int64), [], []
    for _ in range(n):
        logits = np.empty((1, c.n_vocab), np.float32)
        dbg = m.debug_args()  # the traceable forward (cpu_forward.forward), with an empty trace table
        if capture:
            off, buf, _ = trace_table(c, keys, toks.size, state.n_past)
            dbg = m.debug_args(off, buf)
        m.forward_into(toks, logits, m.no_capture, state, dbg)
        state.n_past += toks.size
        nxt = int(np.argmax(logits[0]))
        out.append(nxt)
        all_logits.append(logits.copy())
        toks = np.array([nxt], np.int64)
    return out, all_logits


@pytest.mark.parametrize("name", MODELS)
def test_capture_is_read_only_greedy_tokens_byte_identical(name):
    m = model(name)
    ids = m.encode(PROMPT)
    plain, lp = _greedy(m, ids, 12, capture=False)
    traced, lt = _greedy(m, ids, 12, capture=True)
    assert traced == plain
    for a, b in zip(lp, lt, strict=True):
        assert a.tobytes() == b.tobytes()


# -- trace folders and the CLI -----------------------------------------------------------------


def test_trace_save_load_round_trip(tmp_path):
    m = model("smollm2-135m")
    tr = trace(m, PROMPT, stages="embedding,attn_softmax,lm_head,final_norm", layers="0..1", save_dir=tmp_path)
    for (la, st) in tr.keys():
        p = stage_path(tmp_path, la, st)
        assert p.is_file()
        layer, vals = read_aprt(p)
        assert layer == la and np.array_equal(vals, tr.tensors[(la, st)].ravel())
    assert (tmp_path / "layer-0" / "embedding.bin").is_file() and (tmp_path / "lm_head.bin").is_file()
    assert not (tmp_path / "layer-1" / "embedding.bin").exists()
    back = Trace.load(tmp_path)
    assert back.tokens == tr.tokens and set(back.tensors) == set(tr.tensors)
    for k, a in tr.tensors.items():
        assert back.tensors[k].shape == a.shape and np.array_equal(back.tensors[k], a)
    rows = diff_traces(tr, back)
    assert all(r is not None and r.max_abs_diff == 0 for _, r, _ in rows)


def test_cli_trace_writes_aprt_files(tmp_path, capsys):
    d = tmp_path / "tr"
    rc = main(["trace", "smollm2-135m", "-p", PROMPT, "--save-tensor", "Attn_Norm, layer_output,lm_head",
               "--save-tensor-layers", "1..2", "--save-tensor-dir", str(d)])
    out = capsys.readouterr().out
    assert rc == 0 and "5 APRT files" in out
    files = sorted(str(p.relative_to(d)) for p in d.rglob("*.bin"))
    assert files == ["layer-1/attn_norm.bin", "layer-1/post_ffn_residual.bin", "layer-2/attn_norm.bin",
                     "layer-2/post_ffn_residual.bin", "lm_head.bin"]
    assert read_aprt(d / "lm_head.bin")[0] is None
    rc = main(["trace", "smollm2-135m", "-p", PROMPT, "--save-tensor", "moe_router", "--save-tensor-dir", str(d)])
    assert rc == 2 and "mixture-of-experts" in capsys.readouterr().err


# -- diff --------------------------------------------------------------------------------------


def test_diff_numbers():
    a = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    b = np.array([1.0, 2.5, 3.0, 3.0], np.float32)
    r = diff_arrays(a, b, limit=2)
    assert r.n == 4 and r.max_abs_diff == 1.0 and r.max_abs_index == 3
    assert r.rms_diff == pytest.approx(np.sqrt((0.25 + 1.0) / 4))
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    assert r.cosine == pytest.approx(float(a64 @ b64 / np.linalg.norm(a64) / np.linalg.norm(b64)), abs=1e-12)
    assert [t["index"] for t in r.top] == [3, 1] and r.top[0] == {"index": 3, "a": 4.0, "b": 3.0, "abs_diff": 1.0}
    assert cosine(np.zeros(3), np.ones(3)) == 0.0
    nan = np.array([1.0, np.nan, 2.0])
    assert np.isnan(cosine(nan, np.array([1.0, 5.0, 2.0])))
    assert cosine(nan, nan * np.array([1, 1, 1.0000001])) == pytest.approx(1.0)  # same NaN place: finite rest
    r = diff_arrays(nan, np.array([1.0, 5.0, 2.0]))
    assert r.max_abs_diff == np.inf and r.max_abs_index == 1 and r.nonfinite_a == 1
    with pytest.raises(ArgumentError, match="length mismatch"):
        diff_arrays(a, a[:3])


def test_diff_files_and_json_schema(tmp_path, capsys):
    rng = np.random.default_rng(1)
    a = rng.standard_normal(300).astype(np.float32)
    b = a + rng.standard_normal(300).astype(np.float32) * 1e-3
    b[17] = np.nan
    pa, pb = write_aprt(tmp_path / "a.bin", a, 3), write_aprt(tmp_path / "b.bin", b, 3)
    r = diff_files(pa, pb, limit=5)
    assert r.layer == 3 and r.max_abs_index == 17 and np.isnan(r.cosine)
    obj = r.to_json()
    validate_diff_json(obj)
    assert obj["schema"] == SCHEMA == DIFF_JSON_SCHEMA["title"] and obj["cosine"] is None
    assert main(["diff", str(pa), str(pa), "--values", "--limit", "3", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    validate_diff_json(obj)
    assert obj["cosine"] == 1.0 and obj["max_abs_diff"] == 0.0 and len(obj["top"]) == 3 and obj["layer"] == 3
    assert main(["diff", str(pa), str(pb), "--values", "--limit", "4"]) == 0
    out = capsys.readouterr().out
    assert "cosine" in out and "max_abs_diff" in out and "rms_diff" in out and "top 4 differences" in out
    with pytest.raises(ModelFormatError, match=r"\$.cosine"):
        validate_diff_json({**obj, "cosine": "1"})
    # errors: layer mismatch, length mismatch, not an APRT file
    write_aprt(tmp_path / "l4.bin", a, 4)
    write_aprt(tmp_path / "w.bin", a, None)
    write_aprt(tmp_path / "short.bin", a[:10], 3)
    (tmp_path / "junk.bin").write_bytes(b"hello world, not a tensor")
    for other, msg in (("l4.bin", "layer mismatch"), ("w.bin", "layer mismatch.*whole-model"),
                       ("short.bin", "length mismatch"), ("junk.bin", "not an APRT")):
        with pytest.raises((ArgumentError, ModelFormatError), match=msg):
            diff_files(pa, tmp_path / other)
        assert main(["diff", str(pa), str(tmp_path / other)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("apr-numba: error:") and err.count("\n") == 1


def test_cli_diff_two_trace_folders(tmp_path, capsys):
    m = model("smollm2-135m")
    trace(m, PROMPT, stages="attn_norm,qkv_bias,lm_head", layers="0..1", save_dir=tmp_path / "a")
    trace(m, PROMPT, stages="attn_norm,qkv_bias,lm_head", layers="0..1", save_dir=tmp_path / "b",
          inject="rope-style@1")
    assert main(["diff", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + 5 and "lm_head" in lines[-1] and "attn_norm" in lines[1]
    assert main(["diff", str(tmp_path / "a"), str(tmp_path / "b"), "--json"]) == 0
    objs = json.loads(capsys.readouterr().out)
    assert [o["stage"] for o in objs] == ["attn_norm", "qkv_bias", "attn_norm", "qkv_bias", "lm_head"]
    for o in objs:
        validate_diff_json(o)
    assert objs[-1]["layer"] is None and objs[-1]["cosine"] < 0.999  # rope-style@1 changed the logits


@pytest.mark.parametrize("name", MODELS)
def test_cpu_and_opencl_agree_on_every_stage(name):
    """CPU vs OpenCL (PoCL here) on every stage of every layer."""
    why = opencl_missing()
    if why:
        pytest.skip(why)
    cpu, ocl = trace(model(name), PROMPT), trace(model(name), PROMPT, backend="opencl")
    assert set(cpu.tensors) == set(ocl.tensors)
    worst = min((cosine(cpu.tensors[k], ocl.tensors[k]), k) for k in cpu.keys())
    assert worst[0] >= 0.99999, worst
    assert compare_traces(ocl, cpu).stage is None


def test_opencl_capture_is_read_only():
    """OpenCL with every stage traced at every step: same greedy tokens and the same logits bytes."""
    why = opencl_missing()
    if why:
        pytest.skip(why)
    from apr_numba.debug.tracing import _opencl_backend_for

    m = model("smollm2-135m")
    be = _opencl_backend_for(m)
    c = m.config
    keys = wanted_keys(parse_stages("all"), list(range(c.n_layer)))

    def greedy(capture: bool):
        state, toks, out = be.new_state(64), np.asarray(m.encode(PROMPT), np.int64), []
        for _ in range(6):
            logits = np.empty((1, c.n_vocab), np.float32)
            dbg = m.debug_args(*trace_table(c, keys, toks.size, state.n_past)[:2]) if capture else None
            be.run(toks, logits, m.no_capture, state, dbg=dbg)
            state.n_past += toks.size
            out.append((int(np.argmax(logits[0])), logits.tobytes()))
            toks = np.array([out[-1][0]], np.int64)
        return out

    assert greedy(True) == greedy(False)


def test_whole_model_stage_names():
    assert WHOLE_MODEL_STAGES == {"final_norm", "lm_head"}
    assert stage_path("d", None, "lm_head").as_posix() == "d/lm_head.bin"
    assert stage_path("d", 4, "attn_norm").as_posix() == "d/layer-4/attn_norm.bin"
