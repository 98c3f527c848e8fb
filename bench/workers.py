"""Decode on persistent workers (backends/cpu_decode.py) against one parallel region per product, side by side.

    PYTHONPATH=. .venv/bin/python bench/workers.py [MODEL ...] [-n 64] [-r 5] [--activations f32,int8]
                                                  [--threads 1,2] [--competitors 0,1]

For each model and activation mode, in one process: decode tok/s (``-n`` single-token steps after a short
prompt, the engine's ``Model.eval``) with ``APR_NUMBA_WORKERS=1`` (the default) and ``=0`` (the region-per-
product path), for each thread count, unloaded and with busy-loop competitor processes. The variants alternate
inside every repetition so that machine noise hits them alike; medians are printed with the CPU model and load
average, and the ratios workers / regions and 2 threads / 1 thread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import busy_processes, cpu_model, load_average  # noqa: E402


def _load(name: str, activations: str):
    from apr_numba.model.decoder import load
    from apr_numba.quants.vnni_pack import ACTIVATIONS_ENV

    os.environ[ACTIVATIONS_ENV] = activations
    try:
        return load(name, n_ctx=512)
    finally:
        os.environ.pop(ACTIVATIONS_ENV, None)


def decode_rate(model, n: int, workers: bool, threads: int) -> float:
    """tok/s of n decode steps after an 8-token prompt, on ``threads`` Numba threads."""
    import numba

    numba.set_num_threads(threads)
    os.environ["APR_NUMBA_WORKERS"] = "1" if workers else "0"
    try:
        model.reset()
        model.eval(list(range(100, 108)))
        t = time.perf_counter()
        for i in range(n):
            model.eval([200 + i])
        return n / (time.perf_counter() - t)
    finally:
        os.environ.pop("APR_NUMBA_WORKERS", None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    ap.add_argument("-n", type=int, default=64, help="decode steps per measurement")
    ap.add_argument("-r", "--reps", type=int, default=5)
    ap.add_argument("--activations", default="f32,int8")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--competitors", default="0,1", help="busy-loop processes during a measurement")
    ap.add_argument("--json", help="also write the results to this file")
    a = ap.parse_args(argv)
    threads = [int(x) for x in a.threads.split(",")]
    comps = [int(x) for x in a.competitors.split(",")]
    print(f"CPU {cpu_model()}; load average {load_average()}")
    out = []
    for name in a.models:
        for act in a.activations.split(","):
            model = _load(name, act)
            decode_rate(model, 4, True, max(threads))  # compile / load both paths
            decode_rate(model, 4, False, max(threads))
            for c in comps:
                rates: dict[tuple, list[float]] = {}
                with busy_processes(c):
                    for _ in range(a.reps):
                        for t in threads:
                            for w in (True, False):
                                rates.setdefault((t, w), []).append(decode_rate(model, a.n, w, t))
                med = {k: statistics.median(v) for k, v in rates.items()}
                row = {"model": name, "activations": act, "competitors": c, "cpu": cpu_model(),
                       "load_average": load_average(),
                       "tok_s": {f"{'workers' if w else 'regions'}_t{t}": med[(t, w)] for (t, w) in med}}
                out.append(row)
                cells = "  ".join(f"{k} {v:6.1f}" for k, v in row["tok_s"].items())
                ratio = "  ".join(f"workers/regions t{t} {med[(t, True)] / med[(t, False)]:.2f}" for t in threads)
                scale = ""
                if 1 in threads and 2 in threads:
                    scale = f"  2t/1t workers {med[(2, True)] / med[(1, True)]:.2f} regions " \
                            f"{med[(2, False)] / med[(1, False)]:.2f}"
                print(f"{name} [{act}] competitors={c}: {cells}\n    {ratio}{scale}")
            model.close()
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
