"""``apr-numba warmup [MODEL]``: compile the Numba kernels into the on-disk cache, showing progress.

Numba compiles a kernel on its first call and keeps it in the cache folder that
:func:`apr_numba.runtime.configure_cache_dir` keys by a hash of the package's sources; a cold first run
otherwise spends minutes with nothing on screen. :func:`compile_progress` listens to Numba's
``numba:compile`` events (a compile that the cache answers sends none) and shows, on a terminal only,
which kernel is compiling, "kernel n of N" and the elapsed time. N is the count the last full compile
recorded (``compile_count.json`` beside the per-source cache folders), else the number of compiled
functions the forward reaches in the source (:func:`reachable_kernels`); a count that runs past it
raises it.

``make install`` runs ``apr-numba warmup`` after pulling the model, so ``make run`` starts warm.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

COUNT_FILE = "compile_count.json"


def reachable_kernels(root=None) -> list[str]:
    """Qualified names of the Numba dispatchers ``root`` (default: the CPU forward and the persistent-worker
    decode) calls, themselves included.

    A static walk of the names each function's code refers to (resolved in its module's globals); a
    kernel compiled for two signatures counts once, so this is a lower bound of the compile count.
    """
    from numba.core.registry import CPUDispatcher

    if root is None:
        from apr_numba.backends.cpu_decode import forward_workers
        from apr_numba.backends.cpu_forward import forward

        roots = [forward, forward_workers]
    else:
        roots = [root]
    seen: dict[int, str] = {}
    stack = list(roots)
    while stack:
        d = stack.pop()
        if id(d) in seen:
            continue
        seen[id(d)] = f"{d.py_func.__module__}.{d.py_func.__qualname__}"
        codes = [d.py_func.__code__]
        while codes:
            co = codes.pop()
            codes.extend(c for c in co.co_consts if hasattr(c, "co_names"))
            for name in co.co_names:
                obj = d.py_func.__globals__.get(name)
                if isinstance(obj, CPUDispatcher) and id(obj) not in seen:
                    stack.append(obj)
    return sorted(seen.values())


def _count_path() -> Path | None:
    import numba

    folder = getattr(numba.config, "CACHE_DIR", "")
    return Path(folder).parent / COUNT_FILE if folder else None


def _expected_count(key: str) -> int:
    p = _count_path()
    try:
        return int(json.loads(p.read_text())[key]) if p else 0
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _record_count(key: str, n: int) -> None:
    p = _count_path()
    if p is None or n == 0:
        return
    try:
        data = json.loads(p.read_text()) if p.exists() else {}
        data[key] = n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(data))
    except (OSError, ValueError):
        pass


class _Progress:
    """Numba compile-event listener: counts compiles and drives a rich progress bar (when one is given)."""

    def __init__(self, expected: int):
        from numba.core import event

        class _Listener(event.Listener):
            def on_start(_self, ev):
                self._start(ev.data["dispatcher"])

            def on_end(_self, ev):
                self._end()

        self.listener = _Listener()
        self.expected = expected
        self.n = 0
        self.stack: list[str] = []
        self.bar = None
        self.task = None

    def _start(self, dispatcher) -> None:
        self.n += 1
        self.stack.append(dispatcher.py_func.__qualname__.rsplit(".", 1)[-1])
        self._update()

    def _end(self) -> None:
        if self.stack:
            self.stack.pop()
        self._update()

    def _update(self) -> None:
        if self.bar is None:
            return
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task("", total=max(self.expected, self.n))
        where = " > ".join(self.stack[-2:]) if self.stack else "linking"
        self.bar.update(self.task, completed=self.n, total=max(self.expected, self.n), description=where, refresh=True)


@contextlib.contextmanager
def compile_progress(enabled: bool | None = None, stream=None, key: str = "forward", label: str = "first run"):
    """Show Numba compiles inside the block on ``stream`` (default stderr) when it is a terminal.

    The bar reads "<label>: compiling kernel n of N <name> <elapsed>" and appears only once a compile starts
    (a warm cache shows nothing).

    Args:
        enabled: force on/off; None: on when ``stream`` is a TTY.
        key: name under which the number of compiles is recorded for the next cold start's "of N"; for
            "forward" with nothing recorded, N is the static :func:`reachable_kernels` count.
        label: prefix of the status line.

    Yields the listener state (``.n`` compiles seen), also when nothing is drawn.
    """
    from numba.core import event

    stream = sys.stderr if stream is None else stream
    show = stream.isatty() if enabled is None else enabled
    expected = _expected_count(key)
    if not expected and key == "forward":
        try:
            expected = len(reachable_kernels())
        except Exception:  # noqa: BLE001 - an estimate only
            expected = 0
    prog = _Progress(expected)
    if show:
        from rich.console import Console
        from rich.markup import escape
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        prog.bar = Progress(TextColumn(escape(f"[apr-numba] {label}: compiling kernel")), MofNCompleteColumn(),
                            BarColumn(), TimeElapsedColumn(), TextColumn("{task.description}"),
                            console=Console(file=stream, force_terminal=enabled or None), auto_refresh=True)
    event.register("numba:compile", prog.listener)
    try:
        yield prog
    finally:
        event.unregister("numba:compile", prog.listener)
        if prog.bar is not None and prog.task is not None:
            prog.bar.stop()
        if prog.n:
            _record_count(key, prog.n)


def add_parser(sub) -> None:
    p = sub.add_parser("warmup", help="compile the Numba kernels into the cache (make install runs it)")
    p.add_argument("model", nargs="?", default=None, help="registry name or path (default smollm2-135m)")
    p.add_argument("--prefill", type=int, default=64, metavar="T",
                   help="also run a T-token prompt so the prefill (BLAS from 64 tokens) path is compiled "
                        "(0: none; default %(default)s)")


def run(a) -> int:
    """Load the model (which compiles the decode path) and run one prefill, with progress; print timings."""
    from apr_numba.hub.registry import DEFAULT_MODEL
    from apr_numba.model.decoder import load

    t0 = time.perf_counter()
    with compile_progress(label="warmup") as prog:
        model = load(a.model or DEFAULT_MODEL, backend="cpu", n_ctx=max(64, a.prefill + 1))
        model.warm_kernels(both=True)  # the region-per-product forward too (long prompts, tracing)
        if a.prefill > 0:
            model.eval([0] * a.prefill, n_logits=1)
            model.reset()
    import numba

    print(f"[apr-numba] warmup: {prog.n} kernels compiled in {time.perf_counter() - t0:.1f} s "
          f"(cache {numba.config.CACHE_DIR})", file=sys.stderr)
    return 0
