"""Start-up time and peak RSS of ``apr-numba run``, against the runtime floor (issue 14, "Memory" and "Cold start").

For each model, in fresh processes (warm kernel cache unless ``--cold``):

* wall time of ``apr-numba run MODEL -p hi -n 1 --cpu --json`` (start to exit, i.e. to the first token),
  with the engine's own split (open, tokenizer, pack, warmup eval, first token) and the import time;
* its peak RSS (``ru_maxrss`` of the child), against file size + KV cache;
* the runtime floor: the same command on a tiny one-layer GGUF (Python + libraries + the compiled kernels,
  no weights to speak of).

``--cold`` points ``APR_NUMBA_KERNEL_CACHE`` at an empty folder for each run (the first-run compile)::

    python bench/startup_memory.py [MODELS...] [-r 3] [--cold] [--n-ctx 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, load_average, run_once  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMPORTS = "import time; t=time.perf_counter(); import apr_numba.cli.main, apr_numba.model.decoder; " \
          "print(time.perf_counter()-t)"


def apr_run(model: str, env: dict, n_ctx: int) -> dict:
    """One ``apr-numba run MODEL -p hi -n 1 --cpu --json`` with its wall time, peak RSS and JSON report."""
    r = run_once([sys.executable, "-m", "apr_numba", "run", model, "-p", "hi", "-n", "1", "--cpu", "--json",
                  "--n-ctx", str(n_ctx)], env)
    if r["rc"] != 0:
        raise SystemExit(f"apr-numba run {model} failed: {r['stderr'].strip().splitlines()[-1:]}")
    r["report"] = json.loads(r["stdout"].strip().splitlines()[-1])
    return r


def tiny_model(folder: Path) -> Path:
    """A one-layer GGUF (tests/tiny_gguf.py) for the runtime floor."""
    sys.path.insert(0, str(ROOT))
    from tests.tiny_gguf import write_tiny_gguf

    p = folder / "tiny.gguf"
    write_tiny_gguf(p)
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="empty kernel cache for every run")
    ap.add_argument("--n-ctx", type=int, default=4096)
    a = ap.parse_args(argv)
    from apr_numba.hub.pull import resolve_model

    print(f"CPU: {cpu_model()}; load average: {load_average()}; {'cold' if a.cold else 'warm'} kernel cache")
    base_env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with tempfile.TemporaryDirectory() as tmp:
        tiny = tiny_model(Path(tmp))
        rows = []
        for name in ["(floor: tiny 1-layer GGUF)", *a.models]:
            target = str(tiny) if name.startswith("(floor") else name
            n_ctx = 64 if name.startswith("(floor") else a.n_ctx
            runs = []
            for _ in range(a.reps):
                env = dict(base_env)
                if a.cold:
                    env["APR_NUMBA_KERNEL_CACHE"] = tempfile.mkdtemp(dir=tmp)
                runs.append(apr_run(target, env, n_ctx))
            imp = [float(subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True,
                                        env=base_env, check=True).stdout) for _ in range(a.reps)]
            rep = runs[-1]["report"]
            path = Path(rep["model"])
            size = path.stat().st_size
            kv = 0
            if not name.startswith("(floor"):
                from apr_numba.arch.spec import ArchSpec
                from apr_numba.formats.gguf_file import GGUFFile

                src = GGUFFile(resolve_model(target))
                emb = src.tensors["token_embd.weight"]
                cfg = ArchSpec.from_metadata(src.metadata, str(path), src.tensors, n_vocab=emb.shape[0]).hp
                kv = 2 * cfg.n_layer * a.n_ctx * cfg.kv_dim * 4
            row = {"model": name, "file_bytes": size, "kv_bytes": kv,
                   "wall_s": statistics.median(r["wall_s"] for r in runs),
                   "maxrss_mb": statistics.median(r["maxrss_kb"] for r in runs) / 1024,
                   "load_s": statistics.median(r["report"]["load_s"] for r in runs),
                   "ttft_s": statistics.median(r["report"]["time_to_first_token_s"] for r in runs),
                   "import_s": statistics.median(imp)}
            rows.append(row)
            print(f"{name:<28} wall {row['wall_s']:6.2f} s (imports {row['import_s']:.2f}, load {row['load_s']:.2f}, "
                  f"first token {row['ttft_s']:.3f})  peak RSS {row['maxrss_mb']:7.1f} MB  file "
                  f"{size / 1e6:7.1f} MB + KV {kv / 1e6:6.1f} MB", flush=True)
    floor = rows[0]["maxrss_mb"]
    for row in rows[1:]:
        fk = (row["file_bytes"] + row["kv_bytes"]) / 1e6
        print(f"{row['model']}: peak RSS / (file + KV) = {row['maxrss_mb'] / fk:.2f}; after the floor "
              f"({floor:.0f} MB): {(row['maxrss_mb'] - floor) / fk:.2f}")
    print(json.dumps({"cpu": cpu_model(), "cold": a.cold, "time": time.time(), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
