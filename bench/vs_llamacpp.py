"""apr-numba vs llama.cpp, side by side in one process on the same GGUF and thread count.

Needs the optional extra: ``pip install -e '.[llamacpp]'`` (llama-cpp-python, built from its sdist;
several minutes on 2 cores). Usage::

    python bench/vs_llamacpp.py [MODEL ...] [-t THREADS] [-p 512] [-n 128] [-r 3] [--json OUT]

For each model: pp (prefill of ``-p`` random tokens) and tg (``-n`` decode steps feeding a fixed token),
as llama-bench measures them; the two engines alternate inside every repetition so that machine noise
hits both alike, with a 0.5 s pause before each run so that neither starts while the other's threads still
spin. Prints tok/s mean ± std for each and the ratio apr-numba / llama.cpp, then both
engines' greedy continuations of one prompt as a sanity check.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, load_average  # noqa: E402

SETTLE_S = 0.5


def _llama(path: str, threads: int, n_ctx: int):
    try:
        from llama_cpp import Llama
    except ImportError:
        sys.exit("llama-cpp-python is not installed: pip install -e '.[llamacpp]'")
    return Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=512,
                 verbose=False)


def _apr_pp(model, state, toks):
    state.n_past = 0
    t = time.perf_counter()
    model.eval(toks, n_logits=1, state=state)
    return len(toks) / (time.perf_counter() - t)


def _apr_tg(model, state, tok, n):
    state.n_past = 0
    model.eval([tok], state=state)
    t = time.perf_counter()
    for _ in range(n):
        model.eval([tok], state=state)
    return n / (time.perf_counter() - t)


def _ll_pp(llm, toks):
    llm.reset()
    t = time.perf_counter()
    llm.eval(list(toks))
    return len(toks) / (time.perf_counter() - t)


def _ll_tg(llm, tok, n):
    llm.reset()
    llm.eval([tok])
    t = time.perf_counter()
    for _ in range(n):
        llm.eval([tok])
    return n / (time.perf_counter() - t)


def _greedy_llama(llm, ids, n):
    llm.reset()
    llm.eval(list(ids))
    out = []
    for _ in range(n):
        # without logits_all, llama-cpp-python 0.3 keeps no scores: read the context's last logits row
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
        tok = int(np.argmax(logits))
        out.append(tok)
        llm.eval([tok])
    return out


def compare(name: str, threads: int, n_prompt: int, n_gen: int, reps: int, prompt: str) -> dict:
    """Run both engines on one model; returns a dict of rates, ratios and greedy outputs."""
    import apr_numba
    from apr_numba import runtime as config

    n_ctx = max(n_prompt, n_gen + 1) + 64
    model = apr_numba.load(name, threads=threads, n_ctx=n_ctx)
    llm = _llama(str(model.path), threads, n_ctx)
    rng = np.random.default_rng(0)
    toks = rng.integers(100, model.config.n_vocab - 100, n_prompt)
    tok = int(toks[0])
    state = model.new_state()
    # warm-up both
    _apr_pp(model, state, toks[:16])
    _ll_pp(llm, toks[:16])
    rates: dict[str, list[float]] = {"apr_pp": [], "ll_pp": [], "apr_tg": [], "ll_tg": []}
    for _ in range(reps):
        # a pause before each run: llama.cpp's worker threads spin for a while after a graph finishes, and a
        # run started during that time would be measured against a busy core (and vice versa)
        for key, fn in (("apr_pp", lambda: _apr_pp(model, state, toks)), ("ll_pp", lambda: _ll_pp(llm, toks)),
                         ("apr_tg", lambda: _apr_tg(model, state, tok, n_gen)),
                         ("ll_tg", lambda: _ll_tg(llm, tok, n_gen))):
            time.sleep(SETTLE_S)
            rates[key].append(fn())
    stats = {k: (statistics.mean(v), statistics.pstdev(v)) for k, v in rates.items()}
    ids = model.encode(prompt)
    model.reset()
    logits = model.eval(ids)[-1]
    apr_ids = []
    for _ in range(24):
        t = int(np.argmax(logits))
        apr_ids.append(t)
        logits = model.eval([t])[-1]
    model.reset()
    ll_ids = _greedy_llama(llm, ids, 24)
    return {
        "model": name, "threads": threads, "threading_layer": config.threading_layer(),
        f"pp{n_prompt}": {"apr": stats["apr_pp"], "llama.cpp": stats["ll_pp"],
                          "ratio": stats["apr_pp"][0] / stats["ll_pp"][0],
                          "best_ratio": max(rates["apr_pp"]) / max(rates["ll_pp"]),
                          "reps": {"apr": rates["apr_pp"], "llama.cpp": rates["ll_pp"]}},
        f"tg{n_gen}": {"apr": stats["apr_tg"], "llama.cpp": stats["ll_tg"],
                       "ratio": stats["apr_tg"][0] / stats["ll_tg"][0],
                       "best_ratio": max(rates["apr_tg"]) / max(rates["ll_tg"]),
                       "reps": {"apr": rates["apr_tg"], "llama.cpp": rates["ll_tg"]}},
        "cpu": cpu_model(), "load_average": load_average(),
        "greedy": {"prompt": prompt, "apr": model.decode(apr_ids), "llama.cpp": model.decode(ll_ids),
                   "same_ids": apr_ids == ll_ids},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--json", help="also write the results to this file")
    a = ap.parse_args(argv)
    results = []
    for name in a.models:
        r = compare(name, a.threads, a.n_prompt, a.n_gen, a.reps, a.prompt)
        results.append(r)
        print(f"\n{name}  threads={r['threads']} ({r['threading_layer']}); CPU {r['cpu']}; load average "
              f"{r['load_average']}")
        for test in (f"pp{a.n_prompt}", f"tg{a.n_gen}"):
            d = r[test]
            print(f"  {test:>6}: apr-numba {d['apr'][0]:8.2f} ± {d['apr'][1]:5.2f}   llama.cpp {d['llama.cpp'][0]:8.2f}"
                  f" ± {d['llama.cpp'][1]:5.2f}   ratio {d['ratio']:.2f} (of the bests {d['best_ratio']:.2f})")
        g = r["greedy"]
        print(f"  greedy apr-numba: {g['apr']!r}\n  greedy llama.cpp: {g['llama.cpp']!r}  (same ids: {g['same_ids']})")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
