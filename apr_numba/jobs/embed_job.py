"""Corpus embedding: ``apr_numba.embed_corpus(model, input, output, backend="local"|"ray")`` and
``apr-numba embed MODEL --input FILE --output FILE``.

Each document's vector is :func:`apr_numba.embed`'s for that text run with BLAS on one thread (same tokenizer,
ragged batch, pooling and normalisation; see :mod:`apr_numba.encoder.embedding` and
:func:`single_threaded_blas`), so it depends neither on the batch, the shard, the backend nor the worker.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from pathlib import Path

import numpy as np

from apr_numba.errors import ArgumentError
from apr_numba.jobs import shards as jio
from apr_numba.jobs.runner import check_backend, run_job
from apr_numba.jobs.shards import ROW, SHARD, PartStore, read_shard, require_pyarrow, where


def embed_reader(path: str, text_column: str, id_column: str, shard):
    """Shard table for the embedding workers: ``_shard`` int64, ``_row`` int64, ``id`` (the input's id
    column when it has one, else the record index), ``text`` string.

    Raises:
        ArgumentError: a record without the text column, a text that is not a string, ids of mixed types.
    """
    pa = require_pyarrow()
    rows = read_shard(path, shard, columns=(text_column, id_column), line_key=text_column)
    texts, ids = [], []
    for r in rows:
        t = r.get(text_column)
        if not isinstance(t, str):
            what = f"no field {text_column!r}" if t is None else \
                f"field {text_column!r} is {type(t).__name__}, not a string"
            raise ArgumentError(f"{where(path, r)}: {what} (the text; see --text-column)")
        texts.append(t)
        ids.append(r.get(id_column, r[ROW]))
    try:
        id_arr = pa.array(ids)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ArgumentError(f"{path}: ids of mixed types in records {shard.start}-{shard.stop - 1} ({exc})") from exc
    n = len(rows)
    return pa.table({SHARD: pa.array([shard.index] * n, pa.int64()), ROW: pa.array([r[ROW] for r in rows], pa.int64()),
                     "id": id_arr, "text": pa.array(texts, pa.string())})


def limit_threads(threads: int | None) -> int:
    """Bound this process's Numba kernel threads (:func:`apr_numba.runtime.set_threads`). Returns the count."""
    from apr_numba import runtime as config

    return config.set_threads(threads)


def single_threaded_blas():
    """Context manager: BLAS (scipy's OpenBLAS, the prefill sgemm) on one thread while a worker computes.

    OpenBLAS's sgemm gives different float32 bits on 1 and on 2+ threads, so a job whose result must not depend
    on the worker (its node's core count, ``--threads``) pins BLAS to one thread everywhere, local and Ray
    alike; the Numba kernels, whose results do not depend on the thread count, do the parallel work. The
    previous BLAS limits are restored on exit. A no-op when threadpoolctl is missing.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


class Embedder:
    """Worker of the embedding job (the Ray Data actor class; also run in-process by the local backend).

    Loads the encoder once; ``__call__(table)`` maps a shard table (:func:`embed_reader`) to
    ``_shard`` int64, ``id``, ``vector`` fixed_size_list<float32>[hidden].
    """

    def __init__(self, model, pooling: str = "mean", normalize: bool = True, max_length: int | None = None,
                 truncate: bool = True, batch_size: int = 32, threads: int | None = None):
        from apr_numba.encoder.model import load_encoder

        n = limit_threads(threads)
        self.model = load_encoder(model, threads=n)
        self.opts = (pooling, normalize, max_length, truncate, int(batch_size))

    def __call__(self, table):
        from apr_numba.encoder.embedding import embed_ids

        pa = require_pyarrow()
        pooling, normalize, max_length, truncate, batch_size = self.opts
        texts = table.column("text").to_pylist()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if truncate else "error")
            ids = self.model.tokenize(texts, max_length=max_length, truncate=truncate)
        with single_threaded_blas():
            vec = embed_ids(self.model, ids, pooling, normalize, batch_size) if texts else \
                np.zeros((0, self.model.hidden_size), np.float32)
        flat = pa.array(np.ascontiguousarray(vec, np.float32).reshape(-1), pa.float32())
        return pa.table({SHARD: table.column(SHARD), "id": table.column("id"),
                         "vector": pa.FixedSizeListArray.from_arrays(flat, vec.shape[1])})


def _model_spec(model):
    """A registry name, or an absolute path when ``model`` names an existing file or folder (so that Ray
    workers, started in another folder, find it); model objects are kept for the local backend."""
    if isinstance(model, (str, Path)) and Path(model).exists():
        return str(Path(model).resolve())
    return model


def output_format(output) -> str:
    """``"npy"`` for a ``.npy`` output, ``"parquet"`` otherwise (``.parquet``/``.pq``).

    Raises:
        ArgumentError: another suffix.
    """
    suffix = Path(output).suffix.lower()
    if suffix == ".npy":
        return "npy"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise ArgumentError(f"{output}: embeddings are written as .parquet or .npy, not {suffix or 'no suffix'}")


def ids_path(output) -> Path:
    """The ids file beside a ``.npy`` output: ``vectors.npy`` -> ``vectors.ids.jsonl`` (one JSON value a line)."""
    p = Path(output)
    return p.with_name(p.stem + ".ids.jsonl")


def _merge_npy(store: PartStore, output: Path, n_rows: int) -> None:
    import json
    import os

    mm, row = None, 0
    tmp, ids_tmp = output.with_name(output.name + ".tmp"), ids_path(output).with_suffix(".tmp")
    with open(ids_tmp, "w", encoding="utf-8") as f:
        for t in store.tables():
            v = t.column("vector").combine_chunks()
            dim = v.type.list_size
            block = v.values.to_numpy(zero_copy_only=False).reshape(-1, dim)
            if mm is None:
                mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_rows, dim))
            mm[row:row + len(block)] = block
            row += len(block)
            for i in t.column("id").to_pylist():
                f.write(json.dumps(i, ensure_ascii=False) + "\n")
    mm.flush()
    del mm
    os.replace(tmp, output)
    os.replace(ids_tmp, ids_path(output))


def embed_corpus(model, input, output, *, backend: str = "local", text_column: str = "text", id_column: str = "id",
                 pooling: str = "mean", normalize: bool = True, max_length: int | None = None, truncate: bool = True,
                 batch_size: int = 32, shard_size: int = 1000, workers: int = 2, threads: int | None = None,
                 ray_address: str | None = None, overwrite: bool = False, progress: bool | None = None) -> dict:
    """Embed every document of ``input`` into ``output``, resumably, with bounded memory.

    Args:
        model: encoder registry name (``"minilm-l6"``), HF folder or ``.apr`` path (an
            :class:`~apr_numba.encoder.model.EncoderModel` works with ``backend="local"`` only).
        input: ``.jsonl`` / ``.parquet`` with a ``text_column`` (and optionally ``id_column``), or plain text
            with one document per line (ids are then the 0-based line indices).
        output: ``.parquet`` (columns ``id``, ``vector`` fixed_size_list<float32>[hidden], one row per
            document in input order) or ``.npy`` (float32 (n_docs, hidden), plus ``NAME.ids.jsonl``).
        backend: ``"local"`` (this process) or ``"ray"`` (Ray Data, ``workers`` actors of ``threads`` threads;
            joins the cluster at ``ray_address``, or the one this process already joined, or starts a local one).
        pooling, normalize, max_length, truncate, batch_size: as in :func:`apr_numba.embed` (texts over
            ``max_length`` tokens are cut silently with ``truncate=True``).
        shard_size: documents per part file (the unit of resumption and of Ray work).
        threads: kernel threads (local default: all cores; per Ray actor default: 1).
        overwrite: replace an existing output and discard old parts.
        progress: tqdm bar on stderr (default: when stderr is a terminal).

    Returns:
        dict: ``rows`` (documents), ``computed_rows``, ``skipped_rows`` (done by an earlier run), ``seconds``,
        ``rows_per_s``, ``backend``, ``output``.

    A run that stops (killed, an error) leaves ``OUTPUT.parts/``; rerunning with the same arguments computes
    only the missing shards and ends with the same output.

    Raises:
        ArgumentError: a bad argument, input (missing, empty, a record without text; file and line named),
            output suffix, existing output without ``overwrite``, parts of another job, Ray not installed.
        ModelFormatError, PullError: the model could not be loaded.
    """
    fmt = output_format(output)
    check_backend(backend, workers, threads)
    require_pyarrow()
    output = Path(output)
    spec = _model_spec(model)
    if backend == "ray" and not isinstance(spec, str):
        raise ArgumentError("backend='ray' needs the model as a name or path (each actor loads its own copy)")
    shards = jio.plan_shards(input, shard_size, columns=(text_column,))
    config = {"job": "embed", "input": jio.fingerprint(input), "model": str(spec), "text_column": text_column,
              "id_column": id_column, "pooling": pooling, "normalize": bool(normalize), "max_length": max_length,
              "truncate": bool(truncate), "shard_size": int(shard_size), "format": fmt}
    store = PartStore(output, config, len(shards), overwrite=overwrite)
    reader = functools.partial(embed_reader, str(Path(input).resolve()), text_column, id_column)
    kwargs = {"model": spec, "pooling": pooling, "normalize": normalize, "max_length": max_length,
              "truncate": truncate, "batch_size": batch_size}
    stats = run_job(shards, store, reader, Embedder, kwargs, backend=backend, ray_address=ray_address,
                    workers=workers, threads=threads, progress=progress)
    if fmt == "npy":
        _merge_npy(store, output, stats["rows"])
    else:
        jio.merge_parquet(store, output)
    store.remove()
    return dict(stats, output=str(output))
