"""The dashboard's engine side (no Textual): the incremental reference shadow against the reference, cosines,
cell formatting, gate rows, the job order, and the replaying engine."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tui.engine import SESSION_SCHEMA, Jobs
from tui.events import Done, Parity, ShadowProgress, Token, gate_row
from tui.fake import FakeEngine
from tui.shadow import ReferenceShadow, layer_cosines
from tui.widgets import cos_cell, fmt_measure, fmt_threshold

SESSION = Path(__file__).parent / "fixtures" / "tui_session.json"


def test_reference_shadow_matches_reference_in_chunks(loaded_model):
    """Fed in chunks through its KV cache, with a rewind, the shadow's block outputs equal the reference's
    full-sequence forward (``forward_traced``, no KV cache) for every block."""
    m = loaded_model("smollm2-135m")
    ids = m.encode("The three primary colors are red, yellow and")
    sh = ReferenceShadow(m, budget_bytes=0)
    parts = [sh.advance(ids[:3]), sh.advance(ids[3:4]), sh.advance(ids[4:])]
    got = np.concatenate(parts, axis=1)  # (L, T, D)
    layers = [0, 1, m.config.n_layer - 1]
    want = sh.ref.forward_traced(ids, layers=layers, whole_model=False)
    for il in layers:
        np.testing.assert_allclose(got[il], want[(il, "post_ffn_residual")], rtol=0, atol=1e-9)
    sh.rewind(2)  # a new turn keeping the first two positions; the trail's pass (a pause point per block)
    paused = []
    again = sh.advance(ids[2:5], pause=lambda: paused.append(1))
    assert len(paused) == m.config.n_layer
    np.testing.assert_allclose(again[0], want[(0, "post_ffn_residual")][2:5], atol=1e-9)
    assert sh.n_past == 5


@pytest.mark.slow
def test_dashboard_chat_turn_feeds_the_apis_ids_at_the_apis_positions():
    """A two-turn chat on qwen2.5-coder-0.5b-instruct, greedy, through the dashboard's Engine and then through
    ``apr_numba.generate`` / ``apr_numba.run`` with the same messages on the same model: turn two evaluates the
    same new ids at the same KV position (the common prefix), so both answer with the same tokens, and the
    answer uses turn one (names Ada: the model's own greedy output, checked by the fact, not copied). The
    dashboard once rewound the cache to 0 while skipping the reused ids, and turn two forgot the name."""
    import apr_numba
    from apr_numba.generation.generate import prompt_ids
    from tui.engine import Engine

    e = Engine("qwen2.5-coder-0.5b", backend="cpu", shadow="off", n_ctx=512)
    e.load(lambda ev: None)
    m = e.model
    calls = []
    real = m.eval

    def spy(ids, n_logits=1, capture_layers=False, state=None):
        st = m.state if state is None else state
        calls.append((st.n_past, [int(i) for i in ids]))
        return real(ids, n_logits, capture_layers=capture_layers, state=state)

    m.eval = spy
    q1, q2 = "My name is Ada.", "What is my name?"
    r1 = e.generate(q1, True, 24, lambda ev: None, lambda: False)
    n1 = len(calls)
    r2 = e.generate(q2, True, 24, lambda ev: None, lambda: False)
    dash = calls[n1:]
    msgs = [{"role": "user", "content": q1}]
    ids2 = prompt_ids(m, msgs + [{"role": "assistant", "content": r1["text"]}, {"role": "user", "content": q2}])
    assert r2["prompt_token_ids"] == ids2
    reused = r2["reused"]
    assert 0 < r2["prefilled"] < reused and dash[0] == (reused, ids2[reused:])  # only the new turn, at its place

    m.state.n_past, m.state.tokens = 0, []  # the API from an empty cache, on the same weights
    calls.clear()
    first = apr_numba.generate(m, msgs, max_tokens=24)
    assert first == r1["text"]
    msgs += [{"role": "assistant", "content": first}, {"role": "user", "content": q2}]
    n1 = len(calls)
    res = apr_numba.run(m, msgs, max_tokens=24)
    assert calls[n1] == dash[0] and (res.n_reused, res.n_prefilled) == (reused, r2["prefilled"])
    assert res.token_ids == r2["token_ids"] and res.text == r2["text"]
    assert "Ada" in r2["text"], r2["text"]


def test_layer_cosines():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 4, 8))
    b = a.copy()
    b[1, 2] *= -1
    b[2, 0] = 0
    cos = layer_cosines(a, b)
    assert cos.shape == (3, 4)
    assert np.allclose(cos[0], 1) and cos[1, 2] == pytest.approx(-1) and cos[2, 0] == 0
    nan = a.copy()
    nan[0, 0, 0] = np.nan
    assert math.isnan(layer_cosines(nan, a)[0, 0])


@pytest.mark.parametrize("c, text, colour", [
    (1 - 2.4e-13, "1-2e-13", "#1b5e20"), (1 - 3e-7, "1-3e-7", "#2e7d32"), (0.99954, "0.99954", "#9e9d24"),
    (0.9951, "0.99510", "#ef6c00"), (0.5, "0.50000", "#c62828"), (1.0, "1", "#1b5e20"), (-0.25, "-0.2500", "#c62828"),
])
def test_cos_cell(c, text, colour):
    txt, style = cos_cell(c)
    assert txt.strip() == text and len(txt) == 7 and colour in style
    assert len(cos_cell(c, compact=True)[0]) == 5


def test_cos_cell_missing_and_nan():
    assert cos_cell(None)[0].strip() == "·"
    assert cos_cell(float("nan"))[0].strip() == "nan"


def test_gate_rows_and_their_cells():
    r = gate_row({"id": "WS-002", "status": "FAIL", "value": 0.1356, "unit": "fraction", "comparison": "<",
                  "threshold": 0.05, "reason": "too many misses", "detail": "how"})
    assert (r.value, r.threshold, r.detail) == (0.1356, 0.05, "too many misses")
    assert (fmt_measure(r.value, r.unit), fmt_threshold(r)) == ("13.6%", "<5%")
    r = gate_row({"id": "GWR-001", "status": "PASS", "value": 1.0, "unit": "ratio", "comparison": "between",
                  "threshold": [1.0, 1.1]})
    assert fmt_threshold(r) == "[1, 1.1]" and fmt_measure(r.value, r.unit) == "1 x"
    na = gate_row({"id": "X-001", "status": "NOT_APPLICABLE", "value": None, "unit": "ms", "reason": "no GPU"})
    assert fmt_measure(na.value, na.unit) == "-" and na.detail == "no GPU"
    assert gate_row({"id": "X-002", "status": "FAIL", "value": float("nan"), "unit": "ms"}).value is None


def test_jobs_generation_goes_before_waiting_gates():
    """A waiting priority job (generation) runs before a waiting gate; no two jobs ever overlap."""
    jobs, order, running = Jobs(), [], []

    def run(name, prio, hold):
        with jobs.job(name, prio):
            running.append(name)
            assert len(running) == 1
            order.append(name)
            time.sleep(hold)
            running.remove(name)

    first = threading.Thread(target=run, args=("gate 1", False, 0.2))
    first.start()
    time.sleep(0.05)
    gate = threading.Thread(target=run, args=("gate 2", False, 0.0))
    gate.start()
    time.sleep(0.02)
    gen = threading.Thread(target=run, args=("generation", True, 0.0))
    gen.start()
    for t in (first, gate, gen):
        t.join(5)
    assert order == ["gate 1", "generation", "gate 2"]


def test_fake_engine_replays_the_recording():
    """The replay emits the recorded tokens in order and each parity row once the recorded backend had
    reached it; every number comes from the file."""
    rec = json.loads(SESSION.read_text())
    assert rec["schema"] == SESSION_SCHEMA
    gen = rec["generations"][-1]
    events = []
    FakeEngine(SESSION).generate("any prompt", False, 10_000, events.append, lambda: False)
    toks = [e for e in events if isinstance(e, Token)]
    assert [t.text for t in toks] == [t["text"] for t in gen["tokens"]]
    rows = [e for e in events if isinstance(e, Parity)]
    assert rows and rows[-1].position == gen["parity"][-1]["position"]
    n_prompt = len(gen["prompt_ids"])
    for e in rows:  # emitted after the token that took the recorded backend past position + lag
        i = sum(1 for x in events[:events.index(e)] if isinstance(x, Token)) - 1
        assert n_prompt + i >= e.position + 1 + e.lag
    done = [e for e in events if isinstance(e, Done)]
    assert len(done) == 1 and done[0].result["text"] == gen["text"]
    assert isinstance(events[-1], ShadowProgress) and events[-1].position == gen["parity"][-1]["position"] + 1


def test_fake_engine_pause_and_cancel():
    eng = FakeEngine(SESSION, pause_at=5)
    events, stop = [], threading.Event()
    th = threading.Thread(target=eng.generate, args=("p", False, 100, events.append, stop.is_set))
    th.start()
    assert eng.paused.wait(5)
    assert sum(isinstance(e, Token) for e in events) == 5
    stop.set()
    th.join(5)
    assert [e for e in events if isinstance(e, Done)][0].result["stop_reason"] == "cancelled"
