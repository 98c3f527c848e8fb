"""Aggregate decode throughput of the server's scheduler: B concurrent sequences vs 1, side by side.

    PYTHONPATH=. .venv/bin/python bench/serve_batching.py [--model smollm2-135m] [-n 32] [--batch 4] [--reps 3]

Runs :class:`apr_numba.serve.scheduler.Scheduler` in-process (no HTTP): admit (prefill) the jobs, then time
only the decode steps, ``sum(tokens) / seconds``. Each step is one batched forward over the active slots
(:meth:`apr_numba.model.Model.eval_batch`: the weights are read once for the B tokens). The issue's target
is >= 2.5x for 4 sequences. Also printed: the forward alone, one ``eval_batch`` of B tokens against one
single-token ``eval``, in wall time and in the calling thread's CPU time (less moved by other processes on
a shared machine; with ``--threads 1`` it is the whole forward's CPU time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, load_average  # noqa: E402

from apr_numba.generation.generate import prompt_ids  # noqa: E402
from apr_numba.generation.sampling import SamplingParams  # noqa: E402
from apr_numba.model.decoder import load  # noqa: E402
from apr_numba.serve.scheduler import Job, Scheduler  # noqa: E402

PROMPTS = ["List the numbers from 1 to 100: 1, 2, 3,", "The alphabet is A, B, C,", "Count down: 100, 99, 98,",
           "Even numbers: 2, 4, 6,"]


def decode_rate(model, b: int, n: int) -> tuple[float, int]:
    """(aggregate decode tok/s, tokens) of b concurrent greedy sequences of n tokens."""
    s = Scheduler(model, n_parallel=b, queue_size=0, n_ctx=256)
    for i in range(b):
        s.submit(Job(prompt_ids(model, PROMPTS[i % len(PROMPTS)]), SamplingParams(), n, lambda _: None))
    s._admit()  # prefill every job (not timed)
    s.step()  # the first token of each comes from the prefill logits
    jobs = [sl.job for sl in s.slots if sl.job is not None]
    done0 = sum(len(j.result.token_ids) for j in jobs)
    t0 = time.perf_counter()
    while s.n_active:
        s.step()
    dt = time.perf_counter() - t0
    toks = sum(len(j.result.token_ids) for j in jobs) - done0
    return toks / dt, toks


def step_times(model, b: int, n_rep: int = 20) -> dict:
    """Seconds (wall, thread CPU; the minimum of n_rep) of one eval_batch of b tokens and of one single eval."""
    states = model.new_states(b, 64)
    for st in states:
        model.eval(list(range(1, 17)), n_logits=0, state=st)
    out = {}
    for name, fn in (("one", lambda: model.eval([5], state=states[0])),
                     ("batch", lambda: model.eval_batch([5] * b, states))):
        wall, cpu = [], []
        for _ in range(n_rep):
            for st in states:
                st.n_past = 16
            t0, c0 = time.perf_counter(), time.thread_time()
            fn()
            wall.append(time.perf_counter() - t0)
            cpu.append(time.thread_time() - c0)
        out[name] = (min(wall), min(cpu))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("-n", type=int, default=32, help="tokens per sequence")
    ap.add_argument("--batch", type=int, default=4, help="concurrent sequences")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="kernel threads (default: all cores)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    threadpool_limits(1, user_api="blas")
    model = load(a.model, n_ctx=256, backend="cpu", threads=a.threads)
    one, many = [], []
    for _ in range(a.reps):  # interleaved, so that load changes on a shared machine hit both alike
        one.append(decode_rate(model, 1, a.n)[0])
        many.append(decode_rate(model, a.batch, a.n)[0])
    st = step_times(model, a.batch)
    step_wall = a.batch * st["one"][0] / st["batch"][0]
    step_cpu = a.batch * st["one"][1] / st["batch"][1]
    res = {"cpu": cpu_model(), "threads": model.threads, "load_average": load_average(), "model": model.path.name,
           "tokens_per_sequence": a.n, "batch": a.batch, "reps": a.reps, "tok_s_1": one, "tok_s_batch": many,
           "ratio_median": statistics.median(many) / statistics.median(one), "ratio_best": max(many) / max(one),
           "step_s": st, "step_ratio_wall": step_wall, "step_ratio_cpu": step_cpu}
    if a.json:
        print(json.dumps(res))
        return
    print(f"CPU: {res['cpu']}, {model.threads} threads, load average {res['load_average']}; model "
          f"{model.path.name}; {a.n} tokens/sequence, {a.reps} reps")
    print(f"1 sequence : {statistics.median(one):7.1f} tok/s decode median (best {max(one):.1f})")
    print(f"{a.batch} sequences: {statistics.median(many):7.1f} tok/s decode aggregate median (best {max(many):.1f})")
    print(f"ratio {res['ratio_median']:.2f}x medians, {res['ratio_best']:.2f}x bests (target 2.5x)")
    print(f"forward alone: eval_batch of {a.batch} {st['batch'][0] * 1e3:.2f} ms vs eval of 1 "
          f"{st['one'][0] * 1e3:.2f} ms -> {step_wall:.2f}x tokens/s (wall); thread CPU {step_cpu:.2f}x")


if __name__ == "__main__":
    main()
