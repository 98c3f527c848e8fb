"""Prefill tok/s against prompt length around the BLAS switch (T = 16), idle and with a busy process.

Issue 14 part 3: a prompt of 16-64 tokens must not be slower per token than one of 15, on an idle
machine and with one competing ``while 1: pass`` process. Both conditions are measured side by side in
one run: every repetition measures each T idle, then each T with the competitor running; the median of
the repetitions is reported::

    python bench/prefill_cliff.py [MODELS...] [-t 2] [-r 5] [--lengths 8,12,15,16,24,32,48,64] [--json out.json]

The BLAS thread pools that are loaded are printed (threadpoolctl), so a run shows whether OpenBLAS could
compete with Numba's threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import busy_processes, cpu_model, load_average  # noqa: E402

LENGTHS = (8, 12, 15, 16, 24, 32, 48, 64)


def prefill_s(model, ids) -> float:
    """Seconds of one prefill of ``ids`` from an empty cache (logits of the last position only)."""
    model.reset()
    t0 = time.perf_counter()
    model.eval(ids, n_logits=1)
    dt = time.perf_counter() - t0
    model.reset()
    return dt


def measure(model, lengths, reps: int, seed: int = 0) -> dict:
    """{condition: {T: median tok/s}} for condition 'idle' and 'busy', interleaved per repetition."""
    import numpy as np

    rng = np.random.default_rng(seed)
    prompts = {T: rng.integers(0, model.config.n_vocab, T).tolist() for T in lengths}
    for T in lengths:  # warm: first calls of each shape path (serial, parallel, BLAS)
        prefill_s(model, prompts[T])
    times = {"idle": {T: [] for T in lengths}, "busy": {T: [] for T in lengths}}
    for _ in range(reps):
        for cond, n_busy in (("idle", 0), ("busy", 1)):
            with busy_processes(n_busy):
                if n_busy:
                    time.sleep(0.2)
                for T in lengths:
                    times[cond][T].append(prefill_s(model, prompts[T]))
    return {cond: {T: T / statistics.median(v) for T, v in d.items()} for cond, d in times.items()}


def blas_pools() -> list[str]:
    """Loaded BLAS libraries and their thread counts, as 'file: N threads'."""
    from threadpoolctl import threadpool_info

    return [f"{Path(i['filepath']).name}: {i['num_threads']} threads" for i in threadpool_info()
            if i["user_api"] == "blas"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--reps", type=int, default=5)
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    ap.add_argument("--json", help="also write the results to this file")
    a = ap.parse_args(argv)
    from apr_numba.model.decoder import load

    lengths = [int(x) for x in a.lengths.split(",")]
    print(f"CPU: {cpu_model()}; load average before: {load_average()}")
    result = {"cpu": cpu_model(), "threads": a.threads, "reps": a.reps, "models": {}}
    for name in a.models:
        model = load(name, backend="cpu", threads=a.threads, n_ctx=256)
        res = measure(model, lengths, a.reps)
        result["models"][name] = res
        result["blas"] = blas_pools()
        ref = {c: res[c][15] if 15 in res[c] else res[c][lengths[0]] for c in res}
        print(f"\n{name} ({a.threads} threads), prefill tok/s, median of {a.reps}; BLAS: {'; '.join(result['blas'])}")
        print(f"{'T':>4} {'idle':>9} {'busy':>9} {'idle/T15':>9} {'busy/T15':>9}")
        for T in lengths:
            print(f"{T:>4} {res['idle'][T]:9.1f} {res['busy'][T]:9.1f} {res['idle'][T] / ref['idle']:9.2f} "
                  f"{res['busy'][T] / ref['busy']:9.2f}")
        long_ = [T for T in lengths if T >= 16]
        for c in ("idle", "busy"):
            worst = min(res[c][T] for T in long_) / ref[c] if long_ else float("nan")
            print(f"  {c}: slowest of T >= 16 per token = {worst:.2f}x of T = 15 (>= 1.0 means no cliff)")
        del model
    print(f"\nload average after: {load_average()}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
