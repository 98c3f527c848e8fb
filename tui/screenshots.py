"""Make the docs' screenshots of the dashboard with the real default model (``app.save_screenshot``)::

    .venv/bin/python -m tui.screenshots docs/

Measures the fast gates, then generates and saves the screen mid-generation at 120x40 and 80x24, stops,
bisects the prompt and saves that screen too. Every number on them was measured during the run.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from tui.app import Dashboard
from tui.engine import Engine

PROMPT = "The three primary colors are"


async def shoot(out: Path, model: str = "smollm2-135m") -> list[Path]:
    engine = Engine(model, n_ctx=1024)
    app = Dashboard(engine, max_tokens=900, prompt=PROMPT, gates_at_start=True)
    saved = []
    async with app.run_test(size=(120, 40)) as pilot:
        while app.loaded is None or not engine.shadow_ready.is_set():
            await asyncio.sleep(0.1)
        while any(w.group in ("gates", "l1") and not w.is_finished for w in app.workers):
            await asyncio.sleep(0.2)
        await pilot.press("enter")
        while app.parity is None or app.parity.token is None or app.parity.token < 24:
            await asyncio.sleep(0.05)
        app.flush()
        await pilot.pause()
        saved.append(Path(app.save_screenshot("dashboard-120x40.svg", str(out))))
        await pilot.resize_terminal(80, 24)
        await pilot.pause(0.3)
        app.flush()
        await pilot.pause()
        saved.append(Path(app.save_screenshot("dashboard-80x24.svg", str(out))))
        await pilot.resize_terminal(120, 40)
        await pilot.press("escape")
        while app.generating:
            await asyncio.sleep(0.05)
        await app.run_bisect().wait()
        await pilot.pause()
        app.flush()
        app.clear_notifications()
        await pilot.pause()
        saved.append(Path(app.save_screenshot("dashboard-bisect.svg", str(out))))
        await pilot.press("q")
    return saved


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0] if args else "docs")
    out.mkdir(parents=True, exist_ok=True)
    for p in asyncio.run(shoot(out)):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
