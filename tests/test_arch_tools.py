""".apr import, the gates and the dashboard engine on the new architectures (issue 13).

On the committed tiny fixtures (tests/fixtures/arch/*.gguf: llama SentencePiece, Llama-3 with ``rope_freqs``,
qwen3, qwen3moe, gemma3; Q8_0 with F32 norms):

* ``.apr`` import is lossless: every tensor's GGML type, shape and bytes equal the GGUF's (read with gguf-py's
  ``GGUFReader``, not the engine's reader), every GGUF key comes back, and the model loaded from the ``.apr``
  gives the GGUF model's logits bit for bit and the same tokens for text;
* the decoder gates that apply to a CPU + OpenCL machine PASS, each by measuring a value that meets its
  registry threshold (apr_numba/gates/core.verdict), and ATTN-SUB-004's bisection names every fault it plants;
* the dashboard engine (tui/engine.py, headless) generates on the gemma3 and qwen3moe fixtures, its float64
  reference shadow gives a per-layer cosine near 1 at every position, and its bisect finds no divergence.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from apr_numba.model.decoder import load

ARCH = Path(__file__).resolve().parent / "fixtures" / "arch"
NAMES = sorted(p.name[: -len("_ref.json")] for p in ARCH.glob("*_ref.json"))
PROMPT = "The quick brown fox"


def gguf_path(name: str) -> Path:
    return ARCH / json.loads((ARCH / f"{name}_ref.json").read_text(encoding="utf-8"))["gguf_file"]


def prompt_ids(name: str) -> list[int]:
    return [int(t) for t in np.load(ARCH / f"{name}_ref.npz")["prompt_ids_1"]]


# -- .apr import -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_apr_import_is_lossless(name, tmp_path):
    from apr_numba.formats.apr_file import AprFile
    from apr_numba.formats.apr_import import import_model

    g = gguf_path(name)
    r = import_model(g, tmp_path / f"{name}.apr")
    apr = AprFile(r.path)
    reader = GGUFReader(str(g))
    assert len(apr.tensors) == len(reader.tensors)
    for t in reader.tensors:
        a = apr.tensors[t.name]
        assert int(a.ggml_type) == int(t.tensor_type), t.name
        assert tuple(a.shape) == tuple(int(x) for x in reversed(t.shape)), t.name  # gguf-py: ggml order
        assert np.array_equal(np.asarray(apr.data(t.name)).view(np.uint8).ravel(),
                              np.asarray(t.data).view(np.uint8).ravel()), t.name
    for key, f in reader.fields.items():  # every GGUF key comes back with gguf-py's value
        if key.startswith("GGUF."):  # header fields (version, counts), not metadata
            continue
        want = f.contents()
        got = apr.metadata[key]
        if isinstance(want, list) and want and isinstance(want[0], float):
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32), err_msg=key)
        elif isinstance(want, float):
            assert np.float32(got) == np.float32(want), key
        else:
            assert got == want, key
    mg = load(g, backend="cpu", n_ctx=64, warmup=False)
    ma = load(r.path, backend="cpu", n_ctx=64, warmup=False)
    assert ma.spec == mg.spec
    ids = prompt_ids(name)
    assert np.array_equal(ma.logits(ids), mg.logits(ids))
    assert ma.encode(PROMPT) == mg.encode(PROMPT) == mg.tokenizer.encode(PROMPT)


# -- gates ---------------------------------------------------------------------------------------------

# Decoder gates with a model-dependent measurement; the WS-* gates measure kernels and a model of minimal
# dimensions, ENC-* the encoder, CPU-GPU-003/004 run the CLI on the registry default, GWR-002/005 need a GPU.
CPU_GATES = ("ATTN-SUB-001", "ATTN-SUB-002", "ATTN-SUB-003", "ATTN-SUB-004", "ATTN-SUB-005")
OPENCL_GATES = ("CPU-GPU-001", "CPU-GPU-002", "CPU-GPU-005", "CPU-GPU-006", "GWR-001", "GWR-003", "GWR-004")


@pytest.fixture(scope="module")
def gate_ctx():
    from apr_numba.gates.context import GateContext

    made = {}

    def get(name):
        if name not in made:
            made[name] = GateContext(str(gguf_path(name)), n_ctx=128)
        return made[name]

    return get


@pytest.mark.parametrize("name", NAMES)
def test_attention_gates_pass(gate_ctx, name):
    from apr_numba.gates import core

    ctx = gate_ctx(name)
    for gid in CPU_GATES:
        r = core.run_gate(core.spec(gid), ctx)
        assert r.status == core.PASS, (gid, r.value, r.reason, r.detail)
        assert r.value is not None
    faults = core.run_gate(core.spec("ATTN-SUB-004"), ctx).data["faults"]
    one_kv = ctx.model.config.n_head_kv == 1  # gqa-map is then a no-op (every head reads the one KV head)
    assert set(faults) == {f"{f}@1" for f in  # the gate plants its faults at layer 1
                           ("attn-scale", "causal-mask-off") + (() if one_kv else ("gqa-map",))}, faults
    for v in faults.values():
        assert v["named"] == v["expected"]


@pytest.mark.parametrize("name", NAMES)
def test_opencl_gates_pass(gate_ctx, name):
    from apr_numba.gates import core
    from tests.trace_testlib import opencl_missing

    why = opencl_missing()
    if why:
        pytest.skip(why)
    ctx = gate_ctx(name)
    for gid in OPENCL_GATES:
        r = core.run_gate(core.spec(gid), ctx)
        assert r.status == core.PASS, (gid, r.value, r.reason, r.detail)
    cos = core.run_gate(core.spec("CPU-GPU-002"), ctx).value
    assert cos >= 0.99999  # these tiny files agree far better than the gate's 0.99


# -- the dashboard engine -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gemma3", "qwen3moe"])
def test_dashboard_engine_generates_with_per_layer_parity(name):
    from tui.engine import Engine
    from tui.events import Bisected, Done, Loaded, Parity, Token

    events: list = []
    eng = Engine(str(gguf_path(name)), backend="cpu", shadow="reference", n_ctx=128)
    loaded = eng.load(events.append)
    assert isinstance(loaded, Loaded) and loaded.shadow == "reference" and loaded.info.arch == name
    stop = threading.Event()
    worker = threading.Thread(target=eng.shadow_loop, args=(events.append, stop.is_set), daemon=True)
    worker.start()
    try:
        assert eng.shadow_ready.wait(120)
        n = 12
        res = eng.generate(PROMPT, False, n, events.append, lambda: False)
        assert res["stop_reason"] in ("length", "eos", "stop"), res
        toks = [e for e in events if isinstance(e, Token)]
        assert toks and sum(isinstance(e, Done) for e in events) == 1
        n_pos = len(res["prompt_token_ids"]) + len(res["token_ids"]) - 1  # the last token is never fed back
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            seen = {e.position for e in list(events) if isinstance(e, Parity)}
            if seen >= set(range(n_pos)):
                break
            time.sleep(0.2)
        rows = [e for e in list(events) if isinstance(e, Parity)]
        assert {e.position for e in rows} >= set(range(n_pos)), "the shadow did not cover every position"
        L = eng.model.config.n_layer
        for e in rows:
            assert len(e.cosines) == L and min(e.cosines) > 0.9999, (e.position, e.cosines)
    finally:
        stop.set()
        worker.join(30)
    b = eng.bisect(events.append)
    assert isinstance(b, Bisected) and b.layer is None and "no divergence" in b.summary, b.summary
