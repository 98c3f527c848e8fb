"""Aggregate decode throughput of the server's scheduler: B concurrent sequences vs 1, side by side.

    PYTHONPATH=. .venv/bin/python bench/serve_batching.py [--model smollm2-135m] [-n 32] [--batch 4] [--reps 2]

Runs :class:`apr_numba.serve.scheduler.Scheduler` in-process (no HTTP): admit (prefill) the jobs, then time
only the decode steps, ``sum(tokens) / seconds``. The issue's target is >= 2.5x for 4 sequences; with the
sequential :meth:`Scheduler.forward` (one single-token forward per slot, each reading all the weights) the
ratio is about 1x -- the number a batched forward (weights read once for B tokens) has to beat.
"""

from __future__ import annotations

import argparse
import platform
import time

from threadpoolctl import threadpool_limits

from apr_numba.generation.generate import prompt_ids
from apr_numba.generation.sampling import SamplingParams
from apr_numba.model.decoder import load
from apr_numba.serve.scheduler import Job, Scheduler

PROMPTS = ["List the numbers from 1 to 100: 1, 2, 3,", "The alphabet is A, B, C,", "Count down: 100, 99, 98,",
           "Even numbers: 2, 4, 6,"]


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


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


def main() -> None:
    ap = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("-n", type=int, default=32, help="tokens per sequence")
    ap.add_argument("--batch", type=int, default=4, help="concurrent sequences")
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    threadpool_limits(1, user_api="blas")
    model = load(a.model, n_ctx=256, backend="cpu")
    one, many = [], []
    for _ in range(a.reps):  # interleaved, so that load changes on a shared machine hit both alike
        one.append(decode_rate(model, 1, a.n)[0])
        many.append(decode_rate(model, a.batch, a.n)[0])
    r1, rb = max(one), max(many)
    print(f"CPU: {cpu_model()}, {model.threads} threads; model {model.path.name}; {a.n} tokens/sequence, "
          f"best of {a.reps}")
    print(f"1 sequence : {r1:7.1f} tok/s decode")
    print(f"{a.batch} sequences: {rb:7.1f} tok/s decode aggregate")
    print(f"ratio {rb / r1:.2f}x (target 2.5x; Scheduler.forward steps the slots one after another)")


if __name__ == "__main__":
    main()
