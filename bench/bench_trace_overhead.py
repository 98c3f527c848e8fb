"""What the stage capture costs when it is off (and when it is on), measured on decode.

Tracing lives inside the compiled forward (:func:`apr_numba.backends.cpu_forward.forward`): every stage is followed
by ``_cap(trace_off, trace_buf, stage, layer, array)``, which returns at once when the stage's offset is
-1. The normal, untraced path *is* that code with an all -1 table (``Model.no_debug``), so "normal" and
"all -1 table" are the same thing; to show what the capture code's existence costs, this script also
builds a second forward from the same source with every capture statement removed (``_cap`` calls, the
attention / silu / final-norm capture branches) and compares the three, interleaved:

* ``stripped``: the forward without any capture code (compiled here, not cached);
* ``untraced``: the real forward, all -1 table (what ``apr-numba run`` executes);
* ``traced``: the real forward capturing all stages of all layers at every step (buffer allocated per
  step, as ``apr_numba.debug.tracing`` does).

Usage::

    python bench/bench_trace_overhead.py [MODEL] [-n 64] [-r 5] [-t THREADS] [--json]

Reports median (and best) decode tok/s per variant and the ratios untraced / stripped and
traced / untraced. The teaching-fault flag reads (one int per layer per fault) stay in both forwards.
On a shared, loaded machine use ``-t 1`` and more reps: parallel regions under contention add noise
far larger than the effect measured.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time

import numpy as np


def stripped_forward():
    """The forward of apr_numba.backends.cpu_forward compiled from its source with every capture statement removed."""
    from numba import njit

    from apr_numba.backends import cpu_forward as fmod

    src = inspect.getsource(fmod.forward.py_func)
    lines = src.splitlines()
    out, i, removed = [], 0, 0
    while i < len(lines):
        ln = lines[i]
        s = ln.strip()
        ind = len(ln) - len(ln.lstrip())
        if s.startswith("@njit"):
            i += 1
            continue
        if s.startswith("_cap("):
            i, removed = i + 1, removed + 1
            continue
        if s.startswith("so = trace_off[S_ATTN_SCORES"):
            # so/po lines, then "if so >= 0 and po >= 0: ... else: attention(..., no_cap, no_cap)"
            j = i
            while not (lines[j].strip() == "else:" and len(lines[j]) - len(lines[j].lstrip()) == ind):
                j += 1
            call = lines[j + 1].strip()
            assert call.startswith("attention(") and "no_cap, no_cap" in call, call
            out.append(" " * ind + call)
            i, removed = j + 2, removed + 1
            continue
        if s.startswith("if trace_off[") and s.endswith(">= 0:"):  # ffn_silu / final_norm capture branches
            j = i + 1
            while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > ind):
                j += 1
            i, removed = j, removed + 1
            continue
        out.append(ln)
        i += 1
    assert removed >= 15, f"only {removed} capture statements found: apr_numba.backends.cpu_forward changed shape"
    ns = dict(vars(fmod))
    exec("\n".join(out).replace("def forward(", "def forward_stripped(", 1), ns)  # noqa: S102 - our own source
    return njit(fastmath=fmod.FASTMATH, nogil=True)(ns["forward_stripped"]), removed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("-n", "--n-gen", type=int, default=64, help="decode steps per repetition")
    ap.add_argument("-r", "--reps", type=int, default=5)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)

    from apr_numba.debug.tracing import parse_stages, trace_table, wanted_keys
    from apr_numba.model.decoder import load

    m = load(a.model, backend="cpu", threads=a.threads, n_ctx=a.n_gen + 16)
    c, w = m.config, m.weights
    fwd_stripped, n_removed = stripped_forward()
    prompt = np.asarray(m.encode("The capital of France is"), np.int64)
    keys = wanted_keys(parse_stages("all"), list(range(c.n_layer)))

    def run(variant: str) -> float:
        state = m.new_state(a.n_gen + 16, cpu=True)
        logits = np.empty((1, c.n_vocab), np.float32)
        m.forward_into(prompt, logits, m.no_capture, state)
        state.n_past = prompt.size
        tok = np.array([int(np.argmax(logits[0]))], np.int64)
        t0 = time.perf_counter()
        for _ in range(a.n_gen):
            if variant == "stripped":
                fwd_stripped(tok, np.array([state.n_past], np.int64), np.zeros(1, np.int64), m._cfg, m._fp,
                             w.kernel_args(), (m.rope_cos, m.rope_sin, m.rope_layer, m.layer_window), state.k[None],
                             state.v[None], logits, m.no_capture, m.no_debug)
            elif variant == "untraced":
                m.forward_into(tok, logits, m.no_capture, state)
            else:
                off, buf, _ = trace_table(c, keys, 1, state.n_past)
                m.forward_into(tok, logits, m.no_capture, state, m.debug_args(off, buf))
            state.n_past += 1
            tok[0] = int(np.argmax(logits[0]))
        return a.n_gen / (time.perf_counter() - t0)

    variants = ("stripped", "untraced", "traced")
    for v in variants:  # compile / warm up
        run(v)
    rates = {v: [] for v in variants}
    for _ in range(a.reps):
        for v in variants:  # interleaved, so drifting machine load hits every variant alike
            rates[v].append(run(v))
    med = {v: statistics.median(r) for v, r in rates.items()}
    best = {v: max(r) for v, r in rates.items()}
    res = {"model": a.model, "n_gen": a.n_gen, "reps": a.reps, "threads": m.threads,
           "capture_statements_removed": n_removed, "tok_s_median": med, "tok_s_best": best, "tok_s_all": rates,
           "untraced_over_stripped": med["untraced"] / med["stripped"],
           "untraced_over_stripped_best": best["untraced"] / best["stripped"],
           "traced_over_untraced": med["traced"] / med["untraced"]}
    if a.json:
        print(json.dumps(res))
        return 0
    print(f"{a.model}: decode {a.n_gen} tokens x {a.reps} reps, {m.threads} threads "
          f"({n_removed} capture statements removed in 'stripped')")
    for v in variants:
        r = rates[v]
        print(f"  {v:<9} {med[v]:8.1f} tok/s median   (min {min(r):.1f}, best {best[v]:.1f})")
    print(f"  untraced / stripped = {res['untraced_over_stripped']:.3f} (medians), "
          f"{res['untraced_over_stripped_best']:.3f} (bests);  traced / untraced = {res['traced_over_untraced']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
