"""The dashboard headless (``App.run_test`` + Pilot) on the real default model: type a prompt, generate, see
tokens and per-layer cells update, key-to-screen latency while tokens stream, stop mid-way, bisect, save, quit;
and a backend failure mid-generation (shown, fallen back when possible, text kept)."""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import pytest
from textual import events

from tui.app import Dashboard, StatusLine
from tui.engine import SESSION_SCHEMA, Engine
from tui.widgets import LayerCells, PromptArea

LATENCY_LIMIT_S = 0.100


async def wait_for(cond, timeout: float = 120.0, step: float = 0.02) -> None:
    t0 = time.perf_counter()
    while not cond():
        if time.perf_counter() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {cond.__doc__ or cond}")
        await asyncio.sleep(step)


def screen_text(widget) -> str:
    """What a panel shows (its rendered lines) as plain text."""
    return "\n".join(strip.text for strip in widget.render_lines(widget.region.reset_offset))


async def key_latency(app: Dashboard, key: str, expect: str) -> float:
    """Seconds from posting ``key`` (as the terminal driver does) until the status line has rendered ``expect``."""
    status = app.query_one(StatusLine)
    t0 = time.perf_counter()
    app.post_message(events.Key(key, key))
    await wait_for(lambda: status.rendered[0] > t0 and expect in status.rendered[1], timeout=5, step=0.001)
    return status.rendered[0] - t0


@pytest.mark.slow
def test_dashboard_generate_stop_bisect_save_quit(tmp_path):
    asyncio.run(_generate_stop_bisect_save_quit(tmp_path))


async def _generate_stop_bisect_save_quit(tmp_path):
    engine = Engine("smollm2-135m", backend="cpu", n_ctx=512)  # the default shadow on the CPU: the reference
    app = Dashboard(engine, max_tokens=480, prompt="", gates_at_start=False, save_dir=tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(lambda: app.loaded is not None)
        assert app.loaded.shadow == "reference"
        cells = app.query_one(LayerCells)
        assert "float64 NumPy reference" in screen_text(cells)
        await wait_for(engine.shadow_ready.is_set)

        # type a prompt and generate
        assert isinstance(app.focused, PromptArea)  # the prompt box has the focus from the start
        await pilot.press(*"Once upon a time", "ctrl+j", *"there was")
        assert app.query_one(PromptArea).text == "Once upon a time\nthere was"
        await pilot.press("enter")
        await wait_for(lambda: app.generating or app.result is not None)
        await wait_for(lambda: len(app.tokens) >= 8)
        await pilot.pause()
        app.flush()
        await pilot.pause()
        out = screen_text(app.query_one("#output-text"))
        assert "Once upon a time" in out and app.tokens[1].text.strip() in out

        # keys stay responsive while tokens stream (chat mode on/off renders in the status line); the focus
        # leaves the prompt box first (in it, keys type), without Escape (which would stop the generation)
        app.set_focus(None)
        lat = []
        for i in range(10):
            if not app.generating:
                break
            lat.append(await key_latency(app, "ctrl+t", " chat " if i % 2 == 0 else " text "))
            await asyncio.sleep(0.05)
        assert len(lat) >= 3, "the generation ended before the keys were timed"
        print(f"key-to-screen latency during generation: median {statistics.median(lat) * 1e3:.1f} ms, "
              f"max {max(lat) * 1e3:.1f} ms")
        assert max(lat) < LATENCY_LIMIT_S, lat

        # stop mid-way: the text so far stays
        n_before = app.n_generated
        await pilot.press("escape")
        await wait_for(lambda: not app.generating, timeout=10)
        assert app.result["stop_reason"] == "cancelled"
        assert n_before <= app.n_generated < 480
        text = "".join(t.text for t in app.tokens)
        await pilot.pause()
        app.flush()
        assert text.strip()[:20] in screen_text(app.query_one("#output-text")).replace("\n", " ") or text[:10] in \
            screen_text(app.query_one("#output-text"))

        # the shadow never held the generation up; now idle, it catches up and fills the per-layer cosines
        await wait_for(lambda: app.parity is not None and app.parity.token is not None, timeout=300)
        # the cells redraw on the dashboard's timer (refresh_hz): wait for the redraw of the latest parity
        await wait_for(lambda: f"position {app.parity.position}" in screen_text(cells), timeout=10)
        shown = screen_text(cells)
        assert "1-" in shown or "0.9" in shown  # cosine cells with values
        assert all(c > 0.999 for c in app.parity.cosines), app.parity.cosines

        # bisect the last prompt against the shadow
        await pilot.press("ctrl+r")
        await wait_for(lambda: app.last_bisect is not None, timeout=240)
        assert app.last_bisect.b == "reference"
        assert "no divergence" in app.last_bisect.summary or "first divergence" in app.last_bisect.summary
        await pilot.pause()
        assert app.last_bisect.summary[:40] in app.query_one(StatusLine).rendered[1]

        # save the session
        await pilot.press("ctrl+s")
        await wait_for(lambda: app.last_save is not None, timeout=10)
        saved = json.loads(app.last_save.read_text())
        assert saved["schema"] == SESSION_SCHEMA
        gen = saved["generations"][-1]
        assert gen["prompt"] == "Once upon a time\nthere was" and gen["text"] == text
        assert gen["result"]["stop_reason"] == "cancelled" and gen["parity"]
        assert saved["bisects"] and saved["model"]["n_layer"] == 30

        # help, then quit
        await pilot.press("f1")
        await pilot.pause()
        assert app.screen.__class__.__name__ == "HelpScreen"
        await pilot.press("escape", "escape")  # close the help, leave the prompt box
        await pilot.press("q")
        await pilot.pause()
    assert not app.is_running


def test_backend_failure_keeps_text_and_falls_back(monkeypatch):
    """A backend that raises mid-generation: on the CPU the dashboard reports it and keeps the tokens; on
    another backend it falls back to the CPU and carries on."""
    asyncio.run(_backend_failure(monkeypatch))


async def _backend_failure(monkeypatch):
    engine = Engine("smollm2-135m", backend="cpu", shadow="off", n_ctx=256)
    app = Dashboard(engine, max_tokens=24, prompt="The capital of France is", gates_at_start=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(lambda: app.loaded is not None)
        m = engine.model
        real_run, calls = m.forward_into, {"n": 0}

        def flaky(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 6:
                raise RuntimeError("device lost (injected)")
            return real_run(*args, **kwargs)

        monkeypatch.setattr(m, "forward_into", flaky)
        await pilot.press("enter")
        await wait_for(lambda: not app.generating and app.result is not None)
        assert app.result["stop_reason"] == "error"
        assert app.n_generated == 5  # prefill + 4 decode steps succeeded: 5 tokens kept
        where, reason, fallback = app.failures[-1]
        assert "RuntimeError: device lost" in reason and "no fallback" in fallback
        assert "device lost" in app.query_one(StatusLine).rendered[1]
        app.flush()
        assert app.tokens[0].text.strip() in screen_text(app.query_one("#output-text"))

        # pretend the model runs on another backend: the failure moves it to the CPU and generation continues
        calls["n"] = 0
        m.backend = "opencl"
        await pilot.press("enter")
        await wait_for(lambda: not app.generating and app.result is not None and app.result.get("fallback"))
        assert m.backend == "cpu" and app.result["stop_reason"] == "length"
        assert app.n_generated == 24
        assert "fell back to the CPU" in app.failures[-1][2]
        await pilot.press("q")
