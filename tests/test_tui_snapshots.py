"""Layout snapshots (pytest-textual-snapshot) of the dashboard mid-generation at 120x40 and 80x24.

The numbers come from a recorded real session (tests/fixtures/tui_session.json, made by
tests/fixtures/make_tui_session.py) replayed by tui.fake.FakeEngine, paused mid-generation (:func:`pause_at`), so the
screens are stable. Update the baselines with ``pytest tests/test_tui_snapshots.py --snapshot-update``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tui.app import Dashboard
from tui.fake import FakeEngine

SESSION = Path(__file__).parent / "fixtures" / "tui_session.json"


def pause_at() -> int:
    """Tokens shown: a few past the first recorded shadow pass that covered a generated token."""
    rec = json.loads(SESSION.read_text())["generations"][-1]
    n_prompt, n_tok = len(rec["prompt_ids"]), len(rec["tokens"])
    reached = [p["position"] + 1 + p["lag"] - n_prompt for p in rec["parity"] if p["position"] >= n_prompt]
    return min(min(reached, default=n_tok) + 3, n_tok - 1)


def make_app() -> Dashboard:
    rec = json.loads(SESSION.read_text())["generations"][-1]
    return Dashboard(FakeEngine(SESSION, pause_at=pause_at()), max_tokens=len(rec["tokens"]), prompt=rec["prompt"])


async def mid_generation(pilot) -> None:
    """Load, generate, wait for the replay to pause and every recorded gate row to show, then redraw."""
    app = pilot.app
    while app.loaded is None:
        await asyncio.sleep(0.01)
    await pilot.press("enter")
    n_gates = len(app.engine.data["gates"])
    table = app.query_one("#gates-table")
    while (not app.engine.paused.is_set() or table.row_count < n_gates
           or any(w.group == "gates" and not w.is_finished for w in app.workers)):
        await asyncio.sleep(0.01)
    await pilot.pause()
    app.flush()
    await pilot.pause()


def test_layout_120x40(snap_compare):
    assert snap_compare(make_app(), terminal_size=(120, 40), run_before=mid_generation)


def test_layout_80x24(snap_compare):
    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=mid_generation)


def test_replay_keys_and_mouse():
    """Help, chat mode, prompt history, a click on a layer cell, and a save, on the replay."""

    async def run():
        app = make_app()
        async with app.run_test(size=(120, 40)) as pilot:
            await mid_generation(pilot)
            await pilot.press("escape")
            while app.generating:
                await asyncio.sleep(0.01)
            cells = app.query_one("#cells")
            await pilot.click("#cells", offset=(1 + 1 + 4 + 8 * 2 + 1, 1 + 2))  # border, padding, "  0│", 3rd cell
            await pilot.pause()
            assert any(n.message.startswith("layer 2, position") for n in app._notifications)
            assert cells.parity.cosines[2] > 0.999
            await pilot.press("ctrl+t")
            assert app.chat
            await pilot.press("ctrl+t")
            await pilot.press("ctrl+j", "x")
            area = app.query_one("#prompt")
            assert area.text.endswith("\nx")
            await pilot.press("up", "up")  # history: the prompt generated from
            assert area.text == json.loads(SESSION.read_text())["generations"][-1]["prompt"]
            await pilot.press("escape", "question_mark")  # out of the box, ? is the help key
            assert app.screen.__class__.__name__ == "HelpScreen"
            await pilot.press("escape", "q")
        assert not app.is_running

    asyncio.run(run())
