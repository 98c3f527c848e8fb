"""What a user's keys do (headless Pilot on the replaying engine, so deterministic), and the pieces without
Textual: KV prefix reuse, the shadow's trailing queue, the history cells, titles and the gate summary."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from tui.app import Dashboard, build_parser
from tui.chat import Conversation
from tui.events import GateRow, Parity, ShadowProgress, gates_summary
from tui.fake import FakeEngine
from tui.history import cos_bar
from tui.trail import Trail
from tui.widgets import PromptArea, display_name

SESSION = Path(__file__).parent / "fixtures" / "tui_session.json"


def run(coro):
    return asyncio.run(coro)


def test_prompt_has_focus_and_takes_every_printable_key(tmp_path):
    """No -p: the box is empty with a placeholder and focused; letters that are shortcuts elsewhere only type;
    Escape leaves the box, then single letters are commands; ctrl+ shortcuts work inside the box."""

    async def go():
        app = Dashboard(FakeEngine(SESSION), gates_at_start=False, save_dir=tmp_path)
        async with app.run_test(size=(120, 40)) as pilot:
            area = app.query_one(PromptArea)
            assert isinstance(app.focused, PromptArea) and area.text == "" and "e.g." in str(area.placeholder)
            text = "cbgsinq? Cool, big gates."
            await pilot.press(*text)
            assert area.text == text
            assert not app.chat and app.last_save is None and app.is_running and app.last_bisect is None
            await pilot.press("ctrl+t")  # a modifier shortcut inside the box
            assert app.chat and area.text == text
            await pilot.press("escape")  # leave the box: letters are commands now
            assert not isinstance(app.focused, PromptArea)
            await pilot.press("c")
            assert not app.chat
            await pilot.press("s")
            await pilot.pause()
            assert app.last_save is not None and app.last_save.exists()
            await pilot.press("i", "x")
            assert isinstance(app.focused, PromptArea) and area.text == text + "x"
            await pilot.press("escape", "q")
        assert not app.is_running

    run(go())


def test_p_fills_the_box_and_theme_applies():
    a = build_parser().parse_args(["-p", "Hello", "--theme", "nord"])
    assert a.prompt == "Hello" and a.theme == "nord"
    assert build_parser().parse_args([]).prompt == ""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--theme", "no-such-theme"])

    async def go():
        app = Dashboard(FakeEngine(SESSION), prompt="Hello", gates_at_start=False, theme="nord")
        async with app.run_test(size=(80, 24)) as pilot:
            assert app.query_one(PromptArea).text == "Hello" and app.theme == "nord"
            await pilot.press("ctrl+q")

    run(go())


def test_replay_history_and_save_hold_per_token_cosines(tmp_path):
    """After the replay the cosine history holds every recorded generated-token row, and the help lists keys."""
    rec = json.loads(SESSION.read_text())["generations"][-1]
    n_prompt = len(rec["prompt_ids"])
    want = {p["token"]: p["cosines"] for p in rec["parity"] if p["position"] >= n_prompt}

    async def go():
        app = Dashboard(FakeEngine(SESSION), max_tokens=len(rec["tokens"]), gates_at_start=False, save_dir=tmp_path)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press(*"hi", "enter")
            while app.generating or app.shadow_progress is None:
                await asyncio.sleep(0.01)
            await pilot.pause()
            got = app.cos_history
            assert set(got) == {t for t in want if t < len(rec["tokens"]) - 1}
            for t, cos in got.items():
                assert cos == [float("nan") if c is None else c for c in want[t]]
            await pilot.press("f1")
            assert app.screen.__class__.__name__ == "HelpScreen"
            await pilot.press("escape", "ctrl+q")

    run(go())


def test_conversation_renders_through_the_template():
    class Tok:
        def apply_chat_template(self, msgs, add_generation_prompt):
            assert add_generation_prompt
            return "|".join(f"{m['role']}:{m['content']}" for m in msgs)

    class M:
        tokenizer = Tok()

        def encode(self, text):
            return [ord(c) for c in text]

    c = Conversation("be brief")
    one = c.render(M(), "hi")
    assert "".join(map(chr, one)) == "system:be brief|user:hi"
    c.add_turn("hi", "hello")
    two = "".join(map(chr, c.render(M(), "again")))
    assert two == "system:be brief|user:hi|assistant:hello|user:again" and c.turns == 1
    c.reset()
    assert c.turns == 0 and c.system is None


class ToyShadow:
    """An independent oracle: block l's output at position p for id t is (l + 1) * (t + p), kept per position."""

    kind, label = "toy", "toy"

    def __init__(self, n_layer=3, d=4):
        self.n_layer, self.d, self.n_past, self.seen = n_layer, d, 0, []

    def rewind(self, n):
        self.n_past = min(self.n_past, n)

    def advance(self, ids, pause=None):
        pos = np.arange(self.n_past, self.n_past + ids.size)
        self.seen.append((self.n_past, [int(i) for i in ids]))
        self.n_past += ids.size
        base = (ids + pos).astype(np.float64)
        return np.stack([np.outer((l + 1) * base, np.ones(self.d)) + np.arange(self.d) for l in range(self.n_layer)])


def toy_cap(p0, ids, n_layer=3, d=4, flip=None):
    out = ToyShadow(n_layer, d)
    out.n_past = p0
    cap = out.advance(np.asarray(ids)).astype(np.float32)
    if flip is not None:
        cap[flip] *= -1
    return cap


def test_trail_queue_rewinds_and_compares():
    """The backend never waits; a rewind (a new turn keeping a prefix) supersedes queued positions; the shadow
    runs each position once, in order, and reports a cosine of 1 where the backend agrees and -1 where not."""
    tr = Trail()

    class G:
        prompt_ids = [5, 6, 7]
        parity: list = []

    g = G()
    tr.push(g, 0, np.array([5, 6, 7]), toy_cap(0, [5, 6, 7]))
    tr.push(g, 3, np.array([8]), toy_cap(3, [8]))
    tr.push(g, 4, np.array([9]), toy_cap(4, [9]))
    tr.push(g, 4, np.array([10, 11]), toy_cap(4, [10, 11], flip=(1, 1)))  # a rewind to position 4
    assert [(s.p0, list(s.ids)) for s in tr.pending] == [(0, [5, 6, 7]), (3, [8]), (4, [10, 11])]
    assert tr.behind == 6
    events, sh = [], ToyShadow()
    stop = {"n": 0}

    def cancelled():
        stop["n"] += 1
        return not tr.pending and not tr.working

    tr.run(sh, events.append, cancelled)
    assert sh.seen == [(0, [5, 6, 7, 8, 10, 11])]
    rows = [e for e in events if isinstance(e, Parity)]
    assert [r.position for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [r.token for r in rows] == [None, None, None, 0, 1, 2]
    assert rows[5].cosines[1] == pytest.approx(-1) and rows[5].cosines[0] == pytest.approx(1)
    assert all(c == pytest.approx(1) for r in rows[:5] for c in r.cosines)
    assert isinstance(events[-1], ShadowProgress) and events[-1].behind == 0
    assert len(g.parity) == 6


def test_trail_waits_while_foreground_and_keeps_cap_budget():
    tr = Trail(pending_bytes=2 * toy_cap(0, [1]).nbytes)
    for p in range(4):
        tr.push(None, p, np.array([p]), toy_cap(p, [p]))
    assert [s.cap is None for s in tr.pending] == [True, True, False, False]  # the oldest outputs dropped
    with tr.foreground():
        assert tr._take(lambda: True) is None  # never starts a pass while a generation runs
    assert sum(s.ids.size for s in tr._take(lambda: False)) == 4


def test_history_bars_titles_and_gate_summary():
    assert cos_bar(None) == "·" and cos_bar(1.0) == "▁" and cos_bar(1 - 1e-2) == "█"
    assert cos_bar(1 - 1e-12) < cos_bar(1 - 1e-6) < cos_bar(1 - 1e-3)
    assert display_name("Smollm2 135M 8k Lc100K Mix1 Ep2", "/m/SmolLM2-135M-Instruct.Q4_1.gguf") == \
        "SmolLM2-135M-Instruct.Q4_1"
    assert display_name("Qwen2.5 Coder 0.5B Instruct", "/m/qwen2.5-coder-0.5b-instruct.gguf") == \
        "Qwen2.5 Coder 0.5B Instruct"
    assert display_name("", "/m/x.apr") == "x"
    rows = [GateRow("A-001", "PASS"), GateRow("B-002", "FAIL"), GateRow("C-003", "NOT_APPLICABLE"),
            GateRow("D-004", "FAIL")]
    assert gates_summary(rows) == "4 gates: 2 FAIL (B-002, D-004), 1 PASS, 1 N/A"
