"""Decode speed with and without a competing CPU-bound process, for each Numba threading layer.

An OpenMP parallel region whose threads spin-wait collapses when another process holds a core (seen
here: a 2-thread prange region 14x slower than serial). TBB's work stealing degrades gracefully. This
script measures tg tok/s unloaded and with ``--competitors`` busy processes, in one fresh
interpreter per layer (the layer is fixed at a process's first parallel kernel)::

    python bench/contention.py [MODEL] [-t 2] [-n 64] [--competitors 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time
from apr_numba.model.decoder import load
from apr_numba.cli.bench_cmd import bench_model
from apr_numba import runtime as config
m = load(sys.argv[1], threads=int(sys.argv[2]), n_ctx=256)
r = bench_model(m, n_prompt=0, n_gen=int(sys.argv[3]), reps=3)[0]
print(json.dumps({"layer": config.threading_layer(), "tok_s": r.tok_s_mean, "std": r.tok_s_std}))
"""

BUSY = "while True: pass"


def measure(model: str, threads: int, n_gen: int, layer: str, competitors: int) -> dict:
    """tg tok/s of one threading layer with ``competitors`` busy-loop processes running."""
    env = dict(os.environ, APR_NUMBA_THREADING=layer)
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(competitors)]
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, model, str(threads), str(n_gen)], env=env,
                             capture_output=True, text=True, timeout=1800)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    if out.returncode != 0:
        return {"layer": layer, "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument("--competitors", type=int, default=1)
    ap.add_argument("--layers", default="tbb,omp")
    a = ap.parse_args(argv)
    rows = []
    for layer in a.layers.split(","):
        free = measure(a.model, a.threads, a.n_gen, layer, 0)
        loaded = measure(a.model, a.threads, a.n_gen, layer, a.competitors)
        ratio = loaded.get("tok_s", 0) / free["tok_s"] if free.get("tok_s") else float("nan")
        rows.append({"layer": layer, "unloaded": free, "loaded": loaded, "ratio": ratio})
        print(f"{layer:>4}: unloaded {free.get('tok_s', float('nan')):7.1f} tok/s   with {a.competitors} busy "
              f"process(es) {loaded.get('tok_s', float('nan')):7.1f} tok/s   ratio {ratio:.2f}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
