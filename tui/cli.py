"""The ``apr-tui`` command line: arguments, model resolution (pull / verify before the screen switches), run."""

from __future__ import annotations

import argparse
import sys

from textual.theme import BUILTIN_THEMES

from apr_numba.hub.registry import DEFAULT_MODEL


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="apr-tui", description="apr-numba live dashboard: generation, per-layer "
                                "parity against a shadow, speed, L1 proxy and gates")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"registry name, .gguf or .apr path (default {DEFAULT_MODEL}, pulled if missing)")
    p.add_argument("--backend", choices=("auto", "cpu", "opencl"), default="auto")
    p.add_argument("--shadow", choices=("auto", "reference", "cpu", "opencl", "off"), default="auto",
                   help="what the per-layer cosine compares against (auto: reference on the CPU backend for "
                        "GGUF, cpu on OpenCL or for .apr)")
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--n-ctx", type=int, default=None, help="KV cache length (default min(4096, trained))")
    p.add_argument("-n", "--max-tokens", type=int, default=256)
    p.add_argument("-p", "--prompt", default="", help="text to put in the prompt box (default: empty)")
    p.add_argument("--system", default=None, help="chat mode's system prompt (also: type /system TEXT)")
    p.add_argument("--shadow-budget-mb", type=int, default=None,
                   help="float64 weights the reference shadow keeps between passes (default 64; the rest is "
                        "streamed one tensor at a time)")
    p.add_argument("--theme", choices=sorted(BUILTIN_THEMES), default=None, help="a Textual theme")
    p.add_argument("--chat", action="store_true", help="start in chat mode (the model's chat template)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-gates", action="store_true", help="do not run the fast gates at start")
    p.add_argument("--save-dir", default=".", help="where s writes session files")
    p.add_argument("--replay", metavar="SESSION.json", help="replay a saved session instead of running a model")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.replay:
        from tui.fake import FakeEngine

        engine = FakeEngine(a.replay, speed=1.0)
    else:
        from apr_numba.errors import AprError
        from apr_numba.hub.pull import resolve_model
        from tui.engine import Engine

        try:  # pull / verify before the screen switches, so progress and errors show in the terminal
            path = resolve_model(a.model, progress=sys.stderr.isatty())
        except AprError as exc:
            print(f"apr-tui: error: {exc}", file=sys.stderr)
            return 2
        engine = Engine(str(path), backend=a.backend, shadow=a.shadow, threads=a.threads, n_ctx=a.n_ctx,
                        temperature=a.temperature, seed=a.seed, system=a.system,
                        shadow_budget_bytes=None if a.shadow_budget_mb is None else a.shadow_budget_mb * 2**20)
    from tui.app import Dashboard

    app = Dashboard(engine, max_tokens=a.max_tokens, prompt=a.prompt, chat=a.chat, gates_at_start=not a.no_gates,
                    save_dir=a.save_dir, theme=a.theme)
    app.run()
    return 0


