"""Engine decode speed in the dashboard vs ``apr-numba run``, side by side in one run, shadow on (issue 15).

Each round runs ``apr-numba run MODEL -p PROMPT -n N --json`` (its own process) and then the dashboard headless
(``App.run_test``) on the same model and prompt with the default shadow on and the gates measuring when idle:
the prompt is typed into the box and Enter pressed, and the decode tok/s is read from what the speed panel
shows (``Dashboard.decode``). Rounds alternate so that both sides see the same machine load; the medians and
their ratio are printed with the CPU model. The issue's target: dashboard >= 0.9x ``apr-numba run``.

    PYTHONPATH=. .venv/bin/python bench/tui_speed.py [--model smollm2-135m] [-n 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Write two sentences about lighthouses."



def cli_decode(model: str, prompt: str, n: int, threads: int | None) -> float:
    """decode tok/s of one ``apr-numba run`` (a fresh process, as a user runs it)."""
    cmd = [sys.executable, "-m", "apr_numba", "run", model, "-p", prompt, "-n", str(n), "--json", "--backend", "cpu"]
    if threads:
        cmd += ["-t", str(threads)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["decode_tok_s"])


async def tui_decode(engine, prompt: str, n: int) -> tuple[float, float | None]:
    """(decode tok/s the dashboard shows, the shadow's tok/s) for one generation typed into the dashboard."""
    from tui.app import Dashboard

    app = Dashboard(engine, max_tokens=n, gates_at_start=True)
    async with app.run_test(size=(120, 40)) as pilot:
        while app.loaded is None:
            await asyncio.sleep(0.05)
        await pilot.press(*prompt, "enter")
        while not app.generating:
            await asyncio.sleep(0.01)
        while app.generating:
            await asyncio.sleep(0.05)
        shown = app.decode
        sp = app.shadow_progress
        while sp is None or sp.behind:  # let the shadow catch up so that its rate is measured too
            await asyncio.sleep(0.2)
            sp = app.shadow_progress
        await pilot.press("ctrl+q")
    return shown, sp.tok_s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("-n", "--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--prompt", default=PROMPT)
    a = p.parse_args()
    from tui.engine import Engine

    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs), load average {os.getloadavg()[0]:.1f}")
    cli, tui, shadow = [], [], []
    for r in range(a.rounds):
        cli.append(cli_decode(a.model, a.prompt, a.max_tokens, a.threads))
        engine = Engine(a.model, backend="cpu", threads=a.threads)  # shadow auto: the float64 reference
        shown, sh = asyncio.run(tui_decode(engine, a.prompt, a.max_tokens))
        tui.append(shown)
        shadow.append(sh)
        print(f"round {r + 1}: apr-numba run {cli[-1]:.1f} tok/s, apr-tui engine {shown:.1f} tok/s "
              f"(shadow {engine.shadow_kind} {sh or 0:.1f} tok/s, trailing)")
    c, t = statistics.median(cli), statistics.median(tui)
    print(f"median decode: apr-numba run {c:.1f} tok/s, apr-tui {t:.1f} tok/s, ratio {t / c:.2f} (target >= 0.90)")
    return 0 if t >= 0.9 * c else 1


if __name__ == "__main__":
    sys.exit(main())
