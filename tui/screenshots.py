"""Make the docs' screenshots of the dashboard with the real default model (``app.save_screenshot``)::

    .venv/bin/python -m tui.screenshots docs/

Types the prompt, generates, waits for the trailing shadow to catch up and the fast gates to measure (idle
time), saves the screen at 120x40 and 80x24, bisects the prompt and saves that screen too. Every number on
them was measured during the run.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from tui.app import Dashboard
from tui.engine import Engine

PROMPT = "Write two sentences about lighthouses."


async def shoot(out: Path, model: str = "smollm2-135m") -> list[Path]:
    engine = Engine(model, n_ctx=1024)
    app = Dashboard(engine, max_tokens=96, gates_at_start=True)
    saved = []
    async with app.run_test(size=(120, 40)) as pilot:
        while app.loaded is None or not engine.shadow_ready.is_set():
            await asyncio.sleep(0.1)
        await pilot.press(*PROMPT, "enter")  # typed into the focused prompt box, as a user does
        while not app.generating:
            await asyncio.sleep(0.05)
        while app.generating:
            await asyncio.sleep(0.05)
        # the shadow catches up after the reply, then the gates and the L1 proxy measure in idle time
        while (app.shadow_progress is None or app.shadow_progress.behind
               or any(w.group in ("gates", "l1") and not w.is_finished for w in app.workers)):
            await asyncio.sleep(0.2)
        app.flush()
        await pilot.pause()
        saved.append(Path(app.save_screenshot("dashboard-120x40.svg", str(out))))
        await pilot.resize_terminal(80, 24)
        await pilot.pause(0.3)
        app.flush()
        await pilot.pause()
        saved.append(Path(app.save_screenshot("dashboard-80x24.svg", str(out))))
        await pilot.resize_terminal(120, 40)
        await app.run_bisect().wait()
        await pilot.pause()
        app.flush()
        app.clear_notifications()
        await pilot.pause()
        saved.append(Path(app.save_screenshot("dashboard-bisect.svg", str(out))))
        await pilot.press("ctrl+q")
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
