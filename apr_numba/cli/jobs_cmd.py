"""CLI wiring of the corpus jobs: ``apr-numba embed MODEL --input FILE --output FILE`` and
``apr-numba batch MODEL --input FILE --output FILE`` (both with ``--ray [ADDRESS]`` and ``--workers N``).

Only argparse here (building the parser imports nothing heavy); the jobs live in
:mod:`apr_numba.jobs.embed_job` and :mod:`apr_numba.jobs.generate_job`. A one-line summary goes to stderr.
"""

from __future__ import annotations

import sys


def add_common(p, shard_size: int) -> None:
    """Arguments shared by both jobs: output, resume, Ray."""
    p.add_argument("--output", "-o", metavar="FILE", help="result file (resumable: parts go to FILE.parts/)")
    p.add_argument("--shard-size", type=int, default=shard_size, help=f"records per part file (default {shard_size})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output and drop old parts")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on Ray Data: a local cluster, or the cluster at ADDRESS (pip install 'apr-numba[ray]')")
    p.add_argument("--workers", type=int, default=2, help="Ray actors, one model each (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it shows only on a terminal)")


def add_embed_args(p) -> None:
    """The corpus options of ``apr-numba embed`` (``--input`` switches the command to the corpus job)."""
    p.add_argument("--input", "-i", metavar="FILE", help="corpus: .jsonl / .parquet with a text column, or text "
                   "with one document per line; writes --output (.parquet or .npy)")
    p.add_argument("--text-column", default="text", help="text field of .jsonl/.parquet rows (default: text)")
    p.add_argument("--id-column", default="id", help="id field, if present (default: id; else the row index)")
    add_common(p, 1000)


def _backend(a) -> tuple[str, str | None]:
    if a.ray is None:
        return "local", None
    return "ray", None if a.ray == "local" else a.ray


def _summary(stats: dict, unit: str) -> None:
    print(f"[apr-numba] {stats['rows']} {unit} -> {stats['output']} ({stats['computed_rows']} computed, "
          f"{stats['skipped_rows']} resumed); {stats['rows_per_s']:.1f} {unit}/s on {stats['backend']}",
          file=sys.stderr)


def run_embed(a) -> int:
    """``apr-numba embed MODEL --input FILE --output FILE`` for parsed args ``a``."""
    from apr_numba.errors import ArgumentError
    from apr_numba.jobs.embed_job import embed_corpus

    if a.texts:
        raise ArgumentError("pass TEXT arguments or --input FILE, not both")
    if not a.output:
        raise ArgumentError("--input needs --output FILE (.parquet or .npy)")
    backend, address = _backend(a)
    stats = embed_corpus(a.model, a.input, a.output, backend=backend, ray_address=address, workers=a.workers,
                         threads=a.threads, text_column=a.text_column, id_column=a.id_column, pooling=a.pooling,
                         normalize=not a.no_normalize, max_length=a.max_length, truncate=a.truncate,
                         batch_size=a.batch_size, shard_size=a.shard_size, overwrite=a.overwrite,
                         progress=False if a.no_progress else None)
    _summary(stats, "docs")
    return 0


def add_batch_parser(sub) -> None:
    """Register ``apr-numba batch``."""
    p = sub.add_parser("batch", help="batch generation over a file of prompts or chat messages")
    p.add_argument("model", help="registry name, .gguf or .apr path")
    p.add_argument("--input", "-i", metavar="FILE", required=True,
                   help=".jsonl / .parquet rows with prompt or messages (+ max_tokens, temperature, top_p, top_k, "
                        "seed, stop), or text with one prompt per line")
    p.add_argument("-n", "--max-tokens", type=int, default=128, help="default for rows without max_tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="default; 0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="default stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="apply the chat template to plain prompts")
    p.add_argument("--n-ctx", type=int, default=None, help="KV cache length per worker")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (local: all cores; per Ray actor: 1)")
    add_common(p, 16)


def run_batch(a) -> int:
    """Execute ``apr-numba batch`` for parsed args ``a``."""
    from apr_numba.errors import ArgumentError
    from apr_numba.jobs.generate_job import generate_batch

    if not a.output:
        raise ArgumentError("batch needs --output FILE (.jsonl or .parquet)")
    backend, address = _backend(a)
    stats = generate_batch(a.model, a.input, a.output, backend=backend, ray_address=address, workers=a.workers,
                           threads=a.threads, max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p,
                           top_k=a.top_k, repeat_penalty=a.repeat_penalty, seed=a.seed, stop=a.stop, chat=a.chat,
                           n_ctx=a.n_ctx, shard_size=a.shard_size, overwrite=a.overwrite,
                           progress=False if a.no_progress else None)
    _summary(stats, "rows")
    return 0
