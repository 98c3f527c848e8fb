"""``apr-numba bench``: prompt-processing and token-generation throughput in llama-bench's style.

* ``pp N``: prefill of N tokens from an empty cache, tok/s = N / wall time.
* ``tg N``: N decode steps after a one-token prompt, each feeding a fixed token (as llama-bench does),
  tok/s = N / wall time. Logits of every step are computed (the LM head is part of decoding).
* Mean and standard deviation over ``reps`` repetitions after one warm-up run.
* Roofline: bytes of packed weights a decode step reads, and the tok/s the measured memory bandwidth
  would allow (a parallel float32 sum over a buffer much larger than the caches).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
from numba import njit, prange

from apr_numba import runtime as _config
from apr_numba.errors import ArgumentError


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def _sum_f32(a):
    s = 0.0
    for i in prange(a.shape[0]):
        s += a[i]
    return s


def memory_bandwidth_gbs(n_bytes: int = 400 << 20, reps: int = 5) -> float:
    """Best-of-``reps`` read bandwidth in GB/s of a parallel float32 sum over ``n_bytes``."""
    a = np.ones(n_bytes // 4, np.float32)
    _sum_f32(a)
    best = min(_timed(lambda: _sum_f32(a)) for _ in range(reps))
    return n_bytes / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@dataclass
class BenchResult:
    """One benchmark line: test ("pp512", "tg128"), tok/s mean and std, repetitions."""

    test: str
    n_tokens: int
    tok_s_mean: float
    tok_s_std: float
    reps: int


def bench_model(model, n_prompt: int = 512, n_gen: int = 128, reps: int = 3, seed: int = 0) -> list[BenchResult]:
    """Measure pp``n_prompt`` and tg``n_gen`` on a loaded model; uses a throwaway KV cache.

    Raises:
        ArgumentError: sizes < 0, reps < 1, or n_prompt / n_gen beyond the context.
    """
    if n_prompt < 0 or n_gen < 0 or reps < 1:
        raise ArgumentError(f"bench needs -p >= 0, -n >= 0, -r >= 1 (got {n_prompt}, {n_gen}, {reps})")
    if max(n_prompt, n_gen + 1) > model.n_ctx:
        raise ArgumentError(f"bench sizes exceed the context of {model.n_ctx} (use --n-ctx)")
    rng = np.random.default_rng(seed)
    out = []
    state = model.new_state()
    if n_prompt:
        toks = rng.integers(0, model.config.n_vocab, n_prompt)

        def pp():
            state.n_past = 0
            model.eval(toks, n_logits=1, state=state)

        pp()
        times = [_timed(pp) for _ in range(reps)]
        rates = [n_prompt / t for t in times]
        out.append(BenchResult(f"pp{n_prompt}", n_prompt, statistics.mean(rates),
                               statistics.pstdev(rates), reps))
    if n_gen:
        tok = int(rng.integers(0, model.config.n_vocab))

        def tg():
            state.n_past = 0
            model.eval([tok], state=state)
            for _ in range(n_gen):
                model.eval([tok], state=state)

        tg()
        rates = []
        for _ in range(reps):
            state.n_past = 0
            model.eval([tok], state=state)
            t = time.perf_counter()
            for _ in range(n_gen):
                model.eval([tok], state=state)
            rates.append(n_gen / (time.perf_counter() - t))
        out.append(BenchResult(f"tg{n_gen}", n_gen, statistics.mean(rates), statistics.pstdev(rates), reps))
    return out


def run_bench(model_spec, n_prompt: int, n_gen: int, threads: int | None, reps: int, n_ctx: int | None = None,
              measure_bandwidth: bool = True) -> dict:
    """Load ``model_spec`` and benchmark it; returns a JSON-able dict (results, model, machine, roofline)."""
    from apr_numba.model.decoder import load

    ctx = n_ctx or max(n_prompt, n_gen + 1, 16)
    model = load(model_spec, threads=threads, n_ctx=ctx)
    results = bench_model(model, n_prompt, n_gen, reps)
    bytes_per_token = model.weights.packed_bytes
    d = {
        "model": str(model.path), "model_bytes": model.path.stat().st_size, "arch": model.config.arch,
        "backend": model.backend, "threads": model.threads, "threading_layer": _config.threading_layer(),
        "weights_bytes_per_token": bytes_per_token, "results": [asdict(r) for r in results],
    }
    if measure_bandwidth:
        bw = memory_bandwidth_gbs()
        d["memory_bandwidth_gbs"] = bw
        d["roofline_tg_tok_s"] = bw * 1e9 / bytes_per_token
    return d


def render_bench(d: dict) -> None:
    """Print a llama-bench-like table."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{d['model']} ({d['arch']}, {d['model_bytes'] / 2**20:.1f} MiB)")
    for col in ("backend", "threads", "layer", "test", "t/s"):
        t.add_column(col, justify="right")
    for r in d["results"]:
        t.add_row(d["backend"], str(d["threads"]), d["threading_layer"], r["test"],
                  f"{r['tok_s_mean']:.2f} ± {r['tok_s_std']:.2f}")
    con = Console()
    con.print(t)
    if "memory_bandwidth_gbs" in d:
        con.print(f"roofline: {d['weights_bytes_per_token'] / 2**20:.1f} MiB of weights per decode step; "
                  f"measured read bandwidth {d['memory_bandwidth_gbs']:.1f} GB/s -> at most "
                  f"{d['roofline_tg_tok_s']:.0f} tok/s")
