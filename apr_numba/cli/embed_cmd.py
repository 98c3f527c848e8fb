"""``apr-numba embed MODEL TEXT... [--pooling mean|cls] [--no-normalize] [--json] [--no-truncate]``, and the corpus
job ``apr-numba embed MODEL --input FILE --output FILE`` (:mod:`apr_numba.cli.jobs_cmd`).

Kept apart from :mod:`apr_numba.encoder.embedding` so that building the CLI parser imports nothing heavy.
stdout holds only the embeddings (one line of space-separated floats per text, or one JSON object);
the summary and truncation warnings go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings


def add_parser(sub) -> None:
    """Register the ``embed`` subcommand on an argparse subparsers object."""
    p = sub.add_parser("embed", help="sentence embeddings from an encoder (BERT) model")
    p.add_argument("model", help="registry name (minilm-l6), HF model directory, or .apr path")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed (or --input FILE)")
    p.add_argument("--pooling", choices=("mean", "cls"), default="mean", help="default: mean")
    p.add_argument("--no-normalize", action="store_true", help="skip L2 normalisation")
    p.add_argument("--truncate", action=argparse.BooleanOptionalAction, default=True,
                   help="cut texts longer than --max-length with a warning (default); --no-truncate refuses")
    p.add_argument("--max-length", type=int, default=None, help="token limit incl. [CLS]/[SEP] (default 512)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    from apr_numba.cli.jobs_cmd import add_embed_args

    add_embed_args(p)


def run(a) -> int:
    """Execute ``embed`` for parsed args ``a``. Errors propagate as :class:`~apr_numba.errors.AprError`."""
    if a.input is not None:
        from apr_numba.cli.jobs_cmd import run_embed

        return run_embed(a)
    from apr_numba import runtime as config
    from apr_numba.encoder.embedding import embed_ids
    from apr_numba.encoder.model import load_encoder
    from apr_numba.encoder.texts import check_texts
    from apr_numba.errors import ArgumentError

    if not a.texts:
        raise ArgumentError("nothing to embed: pass TEXT arguments or --input FILE")
    texts = check_texts(a.texts)
    model = load_encoder(a.model, threads=a.threads)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = model.tokenize(texts, max_length=a.max_length, truncate=a.truncate)
    for w in caught:
        print(f"apr-numba: warning: {w.message}", file=sys.stderr)
    t0 = time.perf_counter()
    emb = embed_ids(model, ids, a.pooling, not a.no_normalize, a.batch_size)
    dt = time.perf_counter() - t0
    n_tok = [len(x) for x in ids]
    if a.json:
        out = {"model": str(model.path), "pooling": a.pooling, "normalized": not a.no_normalize,
               "dim": int(emb.shape[1]), "n_tokens": n_tok, "embeddings": emb.tolist(),
               "texts_per_s": round(len(texts) / dt, 2) if dt > 0 else None, "threads": model.threads,
               "threading_layer": config.threading_layer(), "load_s": round(model.load_s, 3)}
        print(json.dumps(out))
    else:
        for row in emb:
            print(" ".join(f"{v:.7g}" for v in row))
        print(f"[apr-numba] {len(texts)} texts, {sum(n_tok)} tokens -> dim {emb.shape[1]} ({a.pooling}"
              f"{'' if a.no_normalize else ', normalized'}); {len(texts) / max(dt, 1e-9):.1f} texts/s; "
              f"threads={model.threads} ({config.threading_layer()}); load {model.load_s:.2f}s", file=sys.stderr)
    return 0
