"""Corpus embedding throughput: one process (all cores) vs Ray Data with N single-threaded actors, side by side.

Both runs embed the same generated corpus with :func:`apr_numba.embed_corpus` in one invocation of this
script, so they see the same machine state; the Ray run's time includes starting the actors and loading one
model per actor (not the Ray cluster's start, done before the clock starts) -- that fixed cost is what a real
job pays once. The outputs are compared bit for bit::

    python bench/corpus_embed.py [--docs 4000] [--workers 2] [--model minilm-l6] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model  # noqa: E402


def write_corpus(path: Path, n: int) -> None:
    words = ["cat", "dog", "river", "stone", "cloud", "engine", "violin", "market", "garden", "theory"]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            text = " ".join(words[(i * 7 + j) % len(words)] for j in range(4 + i % 24))
            f.write(json.dumps({"id": i, "text": text}) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--docs", type=int, default=4000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=250)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)

    import numpy as np
    import pyarrow.parquet as pq
    import ray

    import apr_numba

    with tempfile.TemporaryDirectory(prefix="apr-corpus-bench-") as tmp:
        src = Path(tmp) / "docs.jsonl"
        write_corpus(src, a.docs)
        apr_numba.embed(a.model, ["warm the Numba cache"])  # compiled kernels on disk before either clock starts
        t0 = time.perf_counter()
        apr_numba.embed_corpus(a.model, src, Path(tmp) / "local.parquet", shard_size=a.shard_size,
                                       progress=False)
        local_wall = time.perf_counter() - t0
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False,
                 object_store_memory=200 * 1024 ** 2)
        try:
            t0 = time.perf_counter()
            apr_numba.embed_corpus(a.model, src, Path(tmp) / "ray.parquet", backend="ray",
                                          workers=a.workers, threads=1, shard_size=a.shard_size, progress=False)
            ray_wall = time.perf_counter() - t0
        finally:
            ray.shutdown()
        vec = [pq.read_table(Path(tmp) / f).column("vector").combine_chunks().values.to_numpy()
               for f in ("local.parquet", "ray.parquet")]
        equal = bool(np.array_equal(vec[0], vec[1]))
    out = {"cpu": cpu_model(), "cores": os.cpu_count(), "model": a.model, "docs": a.docs,
           "local": {"threads": os.cpu_count(), "wall_s": round(local_wall, 2),
                     "docs_per_s": round(a.docs / local_wall, 1)},
           "ray": {"workers": a.workers, "threads_per_worker": 1, "wall_s": round(ray_wall, 2),
                   "docs_per_s": round(a.docs / ray_wall, 1)},
           "ray_over_local": round(local_wall / ray_wall, 3), "bit_identical": equal,
           "load_avg_1m": os.getloadavg()[0]}
    if a.json:
        print(json.dumps(out))
    else:
        print(f"CPU: {out['cpu']} ({out['cores']} cores), load average {out['load_avg_1m']:.1f}")
        print(f"{a.docs} docs, {a.model}, shards of {a.shard_size}")
        print(f"  one process, {out['local']['threads']} threads : {out['local']['docs_per_s']:8.1f} docs/s "
              f"({out['local']['wall_s']} s)")
        print(f"  Ray, {a.workers} actors x 1 thread   : {out['ray']['docs_per_s']:8.1f} docs/s "
              f"({out['ray']['wall_s']} s)")
        print(f"  Ray / one process: {out['ray_over_local']}x; outputs bit-identical: {equal}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
