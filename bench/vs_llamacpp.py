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


def _load(name: str, threads: int, n_ctx: int, activations: str):
    """apr-numba's model with its matrices packed for ``activations`` (f32 or int8: quants/vnni_pack.py)."""
    import os

    import apr_numba
    from apr_numba.quants.vnni_pack import ACTIVATIONS_ENV

    old = os.environ.get(ACTIVATIONS_ENV)
    os.environ[ACTIVATIONS_ENV] = activations
    try:
        return apr_numba.load(name, threads=threads, n_ctx=n_ctx)
    finally:
        os.environ.pop(ACTIVATIONS_ENV) if old is None else os.environ.__setitem__(ACTIVATIONS_ENV, old)


def _regions(mode: str, fn, *args):
    """fn(*args), with ``APR_NUMBA_WORKERS=0`` (one parallel region per product instead of the persistent-worker
    decode, backends/cpu_decode.py) when ``mode`` ends in ``/regions``."""
    import os

    if not mode.endswith("/regions"):
        return fn(*args)
    old = os.environ.get("APR_NUMBA_WORKERS")
    os.environ["APR_NUMBA_WORKERS"] = "0"
    try:
        return fn(*args)
    finally:
        os.environ.pop("APR_NUMBA_WORKERS") if old is None else os.environ.__setitem__("APR_NUMBA_WORKERS", old)


def _greedy_apr(model, ids, n):
    model.reset()
    logits = model.eval(ids)[-1]
    out = []
    for _ in range(n):
        t = int(np.argmax(logits))
        out.append(t)
        logits = model.eval([t])[-1]
    model.reset()
    return out


def compare(name: str, threads: int, n_prompt: int, n_gen: int, reps: int, prompt: str,
            modes: tuple[str, ...] = ("f32",)) -> dict:
    """Run llama.cpp and apr-numba (once per activation mode in ``modes``) on one model; returns a dict of
    rates, ratios (apr-numba / llama.cpp) and greedy outputs."""
    from apr_numba import runtime as config

    n_ctx = max(n_prompt, n_gen + 1) + 64
    models = {m: _load(name, threads, n_ctx, m.split("/")[0]) for m in modes}
    model = models[modes[0]]
    llm = _llama(str(model.path), threads, n_ctx)
    rng = np.random.default_rng(0)
    toks = rng.integers(100, model.config.n_vocab - 100, n_prompt)
    tok = int(toks[0])
    states = {m: models[m].new_state() for m in modes}
    # warm-up all
    for m in modes:
        _apr_pp(models[m], states[m], toks[:16])
    _ll_pp(llm, toks[:16])
    runs = [("ll_pp", lambda: _ll_pp(llm, toks)), ("ll_tg", lambda: _ll_tg(llm, tok, n_gen))]
    for m in modes:
        runs += [(f"apr_pp_{m}", lambda m=m: _regions(m, _apr_pp, models[m], states[m], toks)),
                 (f"apr_tg_{m}", lambda m=m: _regions(m, _apr_tg, models[m], states[m], tok, n_gen))]
    rates: dict[str, list[float]] = {k: [] for k, _ in runs}
    for _ in range(reps):
        # a pause before each run: llama.cpp's worker threads spin for a while after a graph finishes, and a
        # run started during that time would be measured against a busy core (and vice versa)
        for key, fn in runs:
            time.sleep(SETTLE_S)
            rates[key].append(fn())
    stats = {k: (statistics.mean(v), statistics.pstdev(v)) for k, v in rates.items()}
    ids = model.encode(prompt)
    ll_ids = _greedy_llama(llm, ids, 24)
    out = {"model": name, "threads": threads, "threading_layer": config.threading_layer(), "cpu": cpu_model(),
           "load_average": load_average(), "modes": list(modes), "greedy": {"prompt": prompt,
           "llama.cpp": model.decode(ll_ids)}}
    for test, n in ((f"pp{n_prompt}", "pp"), (f"tg{n_gen}", "tg")):
        d = {"llama.cpp": stats[f"ll_{n}"], "reps": {"llama.cpp": rates[f"ll_{n}"]}}
        for m in modes:
            a = rates[f"apr_{n}_{m}"]
            d[f"apr_{m}"] = stats[f"apr_{n}_{m}"]
            d[f"ratio_{m}"] = stats[f"apr_{n}_{m}"][0] / stats[f"ll_{n}"][0]
            d[f"best_ratio_{m}"] = max(a) / max(rates[f"ll_{n}"])
            d["reps"][f"apr_{m}"] = a
        out[test] = d
    for m in modes:
        apr_ids = _greedy_apr(models[m], ids, 24)
        out["greedy"][f"apr_{m}"] = models[m].decode(apr_ids)
        out["greedy"][f"same_ids_{m}"] = apr_ids == ll_ids
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--activations", default="f32,int8",
                    help="apr-numba modes to run, comma-separated: f32 (exact) or int8 (llama.cpp's scheme), each "
                         "optionally with /regions (a parallel region per product instead of persistent workers)")
    a = ap.parse_args(argv)
    modes = tuple(x.strip() for x in a.activations.split(",") if x.strip())
    results = []
    for name in a.models:
        r = compare(name, a.threads, a.n_prompt, a.n_gen, a.reps, a.prompt, modes)
        results.append(r)
        print(f"\n{name}  threads={r['threads']} ({r['threading_layer']}); CPU {r['cpu']}; load average "
              f"{r['load_average']}")
        for test in (f"pp{a.n_prompt}", f"tg{a.n_gen}"):
            d = r[test]
            for m in modes:
                print(f"  {test:>6}: apr-numba[{m:>12}] {d[f'apr_{m}'][0]:8.2f} ± {d[f'apr_{m}'][1]:5.2f}   llama.cpp "
                      f"{d['llama.cpp'][0]:8.2f} ± {d['llama.cpp'][1]:5.2f}   ratio {d[f'ratio_{m}']:.2f} "
                      f"(of the bests {d[f'best_ratio_{m}']:.2f})")
        g = r["greedy"]
        print(f"  greedy llama.cpp: {g['llama.cpp']!r}")
        for m in modes:
            print(f"  greedy apr-numba[{m}]: {g[f'apr_{m}']!r}  (same ids: {g[f'same_ids_{m}']})")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
