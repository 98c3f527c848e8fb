"""The synthetic 7B (bench/make_synth_7b.py): load time, peak RSS against file + KV, decode and pp tok/s.

Each engine runs in its own process (so each peak RSS is its own): apr-numba, and llama.cpp when
``llama_cpp`` (llama-cpp-python) imports in ``--llama-python`` (default: this interpreter, then
/work/venv-ref/bin/python). Same file, same thread count, greedy::

    python bench/bench_7b.py [GGUF] [-t 2] [-p 512] [-n 16] [--n-ctx 1024]

A benchmark, not a test: it takes minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, load_average  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "models" / "synth-qwen2.5-7b-q4_k_m.gguf"

APR_CHILD = r"""
import json, resource, sys, time
import numpy as np
path = sys.argv[1]
threads, n_prompt, n_gen, n_ctx = (int(v) for v in sys.argv[2:6])
t0 = time.perf_counter()
from apr_numba.model.decoder import load
m = load(path, backend="cpu", threads=threads, n_ctx=n_ctx)
load_s = time.perf_counter() - t0
rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
toks = np.random.default_rng(0).integers(0, m.config.n_vocab, n_prompt).tolist()
pp = tg = None
if n_prompt:
    m.reset(); t = time.perf_counter(); m.eval(toks, n_logits=1); pp = n_prompt / (time.perf_counter() - t)
m.reset(); m.eval(toks[:1] or [0])
t = time.perf_counter()
tok = 0
for _ in range(n_gen):
    tok = int(np.argmax(m.eval([tok])[0]))
tg = n_gen / (time.perf_counter() - t)
print(json.dumps({"load_s": load_s, "pp_tok_s": pp, "tg_tok_s": tg, "rss_after_load_mb": rss_load / 1024,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "packed_mb": m.weights.packed_bytes / 1e6}))
"""

LLAMA_CHILD = r"""
import json, resource, sys, time
import numpy as np
path = sys.argv[1]
threads, n_prompt, n_gen, n_ctx = (int(v) for v in sys.argv[2:6])
t0 = time.perf_counter()
from llama_cpp import Llama
llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=max(n_prompt, 1),
            verbose=False)
load_s = time.perf_counter() - t0
toks = np.random.default_rng(0).integers(0, llm.n_vocab(), n_prompt).tolist()
pp = None
if n_prompt:
    llm.reset(); t = time.perf_counter(); llm.eval(toks); pp = n_prompt / (time.perf_counter() - t)
llm.reset(); llm.eval(toks[:1] or [0])
t = time.perf_counter()
for _ in range(n_gen):
    llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
tg = n_gen / (time.perf_counter() - t)
print(json.dumps({"load_s": load_s, "pp_tok_s": pp, "tg_tok_s": tg,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "version": __import__("llama_cpp").__version__}))
"""


def child(python: str, code: str, args: list, env: dict | None = None) -> dict:
    """Run a child script; its last stdout line is JSON. Returns {'error': ...} on failure."""
    p = subprocess.run([python, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def llama_python(explicit: str | None) -> str | None:
    """An interpreter in which ``import llama_cpp`` works, or None."""
    for py in [explicit] if explicit else [sys.executable, "/work/venv-ref/bin/python"]:
        if py and Path(py).exists() and subprocess.run([py, "-c", "import llama_cpp"],
                                                       capture_output=True).returncode == 0:
            return py
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", nargs="?", type=Path, default=DEFAULT)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=16)
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--llama-python", default=None)
    a = ap.parse_args(argv)
    if not a.gguf.exists():
        raise SystemExit(f"{a.gguf}: missing; write it with bench/make_synth_7b.py")
    from apr_numba.formats.gguf_file import GGUFFile
    from apr_numba.model.hparams import ModelConfig

    cfg = ModelConfig.from_metadata(GGUFFile(a.gguf).metadata, str(a.gguf))
    file_mb = a.gguf.stat().st_size / 1e6
    kv_mb = 2 * cfg.n_layer * a.n_ctx * cfg.kv_dim * 4 / 1e6
    print(f"CPU: {cpu_model()}; load average {load_average()}; {a.gguf.name}: {file_mb:.0f} MB, KV (float32, "
          f"n_ctx {a.n_ctx}) {kv_mb:.0f} MB; {a.threads} threads, pp{a.n_prompt}, tg{a.n_gen}")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [a.gguf, a.threads, a.n_prompt, a.n_gen, a.n_ctx]
    rows = {"apr-numba": child(sys.executable, APR_CHILD, args, env)}
    py = llama_python(a.llama_python)
    rows["llama.cpp"] = child(py, LLAMA_CHILD, args) if py else {"error": "llama-cpp-python not installed"}
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:>10}: not run ({r['error']})")
            continue
        print(f"{name:>10}: load {r['load_s']:.1f} s, pp{a.n_prompt} {r['pp_tok_s'] or 0:.2f} tok/s, "
              f"tg {r['tg_tok_s']:.2f} tok/s, peak RSS {r['peak_rss_mb']:.0f} MB = "
              f"{r['peak_rss_mb'] / (file_mb + kv_mb):.2f}x (file + KV)")
    if "tg_tok_s" in rows["apr-numba"] and "tg_tok_s" in rows["llama.cpp"]:
        ratio = rows["apr-numba"]["tg_tok_s"] / rows["llama.cpp"]["tg_tok_s"]
        print(f"decode ratio apr-numba / llama.cpp: {ratio:.2f}")
    print(json.dumps({"cpu": cpu_model(), "file_mb": file_mb, "kv_mb": kv_mb, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
