"""The dashboard against ``apr-numba run``, side by side in one run, shadow on (issue 15): engine decode tok/s
and peak RSS.

Each round runs, each in its own process under the same wrapper (``_common.run_once``: the child's peak RSS
from ``ru_maxrss``):

* ``apr-numba run MODEL -p PROMPT -n N --json --backend cpu`` (as a user runs it);
* the dashboard (this script with ``--child``): ``Dashboard`` headless (``App.run_test`` at 120x40) on the same
  model, prompt and context with the default shadow on (the float64 reference) and the gates measuring when
  idle; the prompt is typed into the box and Enter pressed, the decode tok/s is what the speed panel shows
  (``Dashboard.decode``), and the process ends once the shadow has caught up (its tok/s measured too).

Rounds alternate so that both sides see the same machine load; the medians, the speed ratio and the RSS
difference are printed with the CPU model. The issue's targets: dashboard decode >= 0.9x ``apr-numba run``,
dashboard peak RSS <= ``apr-numba run`` + 300 MB (qwen2.5-coder-0.5b).

    PYTHONPATH=. .venv/bin/python bench/tui_speed.py [--model qwen2.5-coder-0.5b] [-n 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, load_average, run_once  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Write two sentences about lighthouses."
RSS_MARGIN_MB = 300
SPEED_RATIO = 0.9


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def cli_round(model: str, prompt: str, n: int, threads: int | None, n_ctx: int | None) -> dict:
    """decode tok/s and peak RSS (MB) of one ``apr-numba run`` (a fresh process)."""
    cmd = [sys.executable, "-m", "apr_numba", "run", model, "-p", prompt, "-n", str(n), "--json", "--backend", "cpu"]
    cmd += ["-t", str(threads)] if threads else []
    cmd += ["--n-ctx", str(n_ctx)] if n_ctx else []
    r = run_once(cmd, _env())
    if r["rc"] != 0:
        raise SystemExit(f"apr-numba run failed: {r['stderr'][-500:]}")
    rep = json.loads(r["stdout"].strip().splitlines()[-1])
    return {"decode": float(rep["decode_tok_s"]), "tokens": len(rep["token_ids"]), "rss_mb": r["maxrss_kb"] / 1024}


def tui_round(model: str, prompt: str, n: int, threads: int | None, n_ctx: int | None, gates: bool = True) -> dict:
    """decode tok/s shown, the shadow's tok/s and peak RSS (MB) of one dashboard process (``--child``)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--model", model, "--prompt", prompt, "-n", str(n)]
    cmd += ["-t", str(threads)] if threads else []
    cmd += ["--n-ctx", str(n_ctx)] if n_ctx else []
    cmd += [] if gates else ["--no-gates"]
    r = run_once(cmd, _env())
    if r["rc"] != 0:
        raise SystemExit(f"dashboard child failed: {r['stderr'][-1500:]}")
    out = json.loads(r["stdout"].strip().splitlines()[-1])
    return out | {"rss_mb": r["maxrss_kb"] / 1024}


async def tui_decode(engine, prompt: str, n: int, gates: bool = True) -> dict:
    """One generation typed into the headless dashboard: the decode tok/s it shows, the shadow's tok/s."""
    from tui.app import Dashboard

    app = Dashboard(engine, max_tokens=n, gates_at_start=gates)
    async with app.run_test(size=(120, 40)) as pilot:
        while app.loaded is None:
            await asyncio.sleep(0.05)
        await pilot.press(*prompt, "enter")
        while not app.generating:
            await asyncio.sleep(0.01)
        while app.generating:
            await asyncio.sleep(0.05)
        shown, tokens, text = app.decode, app.n_generated, "".join(app.output)
        sp = app.shadow_progress
        while sp is None or sp.behind:  # let the shadow catch up so that its rate is measured too
            await asyncio.sleep(0.2)
            sp = app.shadow_progress
        await pilot.press("ctrl+q")
    return {"decode": shown, "tokens": tokens, "text": text, "shadow_tok_s": sp.tok_s, "shadow": engine.shadow_kind,
            "shadow_positions": sp.position,
            "cosines_min": min((min(c) for c in app.cos_history.values()), default=None)}


def child(a) -> int:
    from tui.engine import Engine

    engine = Engine(a.model, backend="cpu", threads=a.threads, n_ctx=a.n_ctx)  # shadow auto: the reference
    print(json.dumps(asyncio.run(tui_decode(engine, a.prompt, a.max_tokens, not a.no_gates))))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("-n", "--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--n-ctx", type=int, default=None, help="both sides (default: each one's own, min(4096, trained))")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--no-gates", action="store_true", help="the dashboard measures no gates (e.g. for a 7B: the "
                   "gate process would load a second copy)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)
    print(f"CPU: {cpu_model()}; load average {load_average()}; model {a.model}, -n {a.max_tokens}", flush=True)
    cli, tui = [], []
    for r in range(a.rounds):
        cli.append(cli_round(a.model, a.prompt, a.max_tokens, a.threads, a.n_ctx))
        tui.append(tui_round(a.model, a.prompt, a.max_tokens, a.threads, a.n_ctx, not a.no_gates))
        c, t = cli[-1], tui[-1]
        print(f"round {r + 1}: apr-numba run {c['decode']:.1f} tok/s ({c['tokens']} tokens), peak RSS "
              f"{c['rss_mb']:.0f} MB | apr-tui engine {t['decode']:.1f} tok/s ({t['tokens']} tokens), peak RSS "
              f"{t['rss_mb']:.0f} MB (shadow {t['shadow']} {t['shadow_tok_s'] or 0:.1f} tok/s, trailing)", flush=True)
    cd, td = statistics.median(x["decode"] for x in cli), statistics.median(x["decode"] for x in tui)
    cr, tr = statistics.median(x["rss_mb"] for x in cli), statistics.median(x["rss_mb"] for x in tui)
    speed_ok, rss_ok = td >= SPEED_RATIO * cd, tr <= cr + RSS_MARGIN_MB
    print(f"median decode: apr-numba run {cd:.1f} tok/s, apr-tui {td:.1f} tok/s, ratio {td / cd:.2f} "
          f"(target >= {SPEED_RATIO:.2f}: {'ok' if speed_ok else 'MISSED'})")
    print(f"median peak RSS: apr-numba run {cr:.0f} MB, apr-tui {tr:.0f} MB, difference {tr - cr:+.0f} MB "
          f"(target <= +{RSS_MARGIN_MB} MB: {'ok' if rss_ok else 'MISSED'})")
    print(json.dumps({"cpu": cpu_model(), "load": load_average(), "model": a.model, "cli": cli, "tui": tui}))
    return 0 if speed_ok and rss_ok else 1


if __name__ == "__main__":
    sys.exit(main())
