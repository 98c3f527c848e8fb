"""``apr-numba gates [MODEL] [--only PATTERN] [--slow] [--json]``: measure the gates and print a table.

Exit status: 0 when no gate FAILs (PASS and NOT_APPLICABLE only), 1 when at least one FAILs (a FAIL is a
measured result, not an error), 2 on a usage error (unknown gate pattern, unknown model).
"""

from __future__ import annotations

import json
import sys

from apr_numba.hub.registry import DEFAULT_MODEL

STYLE = {"PASS": "bold green", "FAIL": "bold red", "NOT_APPLICABLE": "yellow"}


def add_parser(sub) -> None:
    p = sub.add_parser("gates", help="measure aprender's falsifiable gates on this machine and model")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="registry name or path (default %(default)s)")
    p.add_argument("--only", metavar="PATTERN", default=None,
                   help="comma list of gate ids, globs or prefixes (WS-*, ENC, CPU-GPU-00[1-3], GWR-001)")
    p.add_argument("--slow", action="store_true", help="longer measurements (more tokens and repetitions)")
    p.add_argument("--encoder", default="minilm-l6", help="encoder for ENC-* (default minilm-l6)")
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object (schema apr-numba-gates-result-v1)")
    p.add_argument("--list", action="store_true", help="list the registry and exit")


def fmt_value(v, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "fraction":
        return f"{v:.2%}"
    if unit == "cosine":
        return f"{v:.9f}"
    if unit in ("count", "tokens") or (unit == "uploads/token" and float(v).is_integer()):
        return f"{v:g}"
    return f"{v:.6g}"


def fmt_threshold(r) -> str:
    from apr_numba.gates.core import format_threshold

    if r.unit == "fraction" and r.comparison != "between":
        return f"{r.comparison} {r.threshold:.2%}"
    return format_threshold(r.comparison, r.threshold)


def render(results, model: str, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"apr-numba gates: {model}", show_lines=False)
    for col, kw in (("gate", {"no_wrap": True}), ("verdict", {"no_wrap": True}),
                    ("value", {"justify": "right", "no_wrap": True}), ("threshold", {"no_wrap": True}),
                    ("unit", {"no_wrap": True}), ("detail", {"overflow": "fold", "ratio": 1})):
        t.add_column(col, **kw)
    for r in results:
        extra = "".join(f"; {k} {v:g}" for k, v in r.also.items())
        detail = (r.reason + " | " if r.reason else "") + r.detail + extra
        t.add_row(r.id, f"[{STYLE[r.status]}]{r.status}[/]", fmt_value(r.value, r.unit), fmt_threshold(r), r.unit,
                  detail)
    con = console or (Console() if sys.stdout.isatty() else Console(width=200))
    con.print(t)
    n = {s: sum(r.status == s for r in results) for s in STYLE}
    con.print(f"{n['PASS']} PASS, {n['FAIL']} FAIL, {n['NOT_APPLICABLE']} NOT_APPLICABLE; "
              f"{sum(r.duration_s for r in results):.1f} s")


def run(a) -> int:
    from apr_numba.errors import ArgumentError
    from apr_numba.gates import registry, select
    from apr_numba.gates import run as run_gates

    if a.list:
        for s in registry():
            print(f"{s.id:<13} {s.rule}")
        return 0
    if not select(a.only):
        raise ArgumentError(f"--only {a.only!r} matches no gate (ids: {', '.join(s.id for s in registry())})")
    progress = None
    if not a.json and sys.stderr.isatty():
        def progress(r):
            print(f"  {r.id}: {r.status} ({r.duration_s:.1f} s)", file=sys.stderr, flush=True)
    results = run_gates(a.model, only=a.only, slow=a.slow, progress_cb=progress, encoder=a.encoder,
                        threads=a.threads)
    if a.json:
        print(json.dumps({"schema": "apr-numba-gates-result-v1", "model": str(a.model), "slow": bool(a.slow),
                          "results": [r.to_dict() for r in results]}, ensure_ascii=False))
    else:
        render(results, str(a.model))
    return 1 if any(r.status == "FAIL" for r in results) else 0
