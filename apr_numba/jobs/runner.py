"""One driver for every corpus job: plan the shards, skip the finished ones, run the rest on this process
(``backend="local"``) or on Ray (``backend="ray"``), with a progress bar in documents per second."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from apr_numba.errors import ArgumentError
from apr_numba.jobs.shards import PartStore, Shard

BACKENDS = ("local", "ray")


def check_backend(backend: str, workers: int, threads: int | None) -> None:
    """Raise ArgumentError for an unknown backend, ``workers < 1`` or ``threads < 1``; for ``"ray"`` also when
    Ray is not installed (before any model is loaded)."""
    if backend not in BACKENDS:
        raise ArgumentError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if isinstance(workers, bool) or int(workers) < 1:
        raise ArgumentError(f"workers must be >= 1, got {workers}")
    if threads is not None and int(threads) < 1:
        raise ArgumentError(f"threads must be >= 1, got {threads}")
    if backend == "ray":
        from apr_numba.jobs.ray_backend import require_ray

        require_ray()


def run_job(shards: list[Shard], store: PartStore, reader: Callable, worker_cls, worker_kwargs: dict, *,
            backend: str = "local", ray_address: str | None = None, workers: int = 2, threads: int | None = None,
            progress: bool | None = None, unit: str = "doc") -> dict:
    """Run the shards whose parts are missing and return ``{"rows", "skipped_rows", "seconds", "rows_per_s"}``.

    ``reader(shard)`` gives the shard's input table; ``worker_cls(**worker_kwargs, threads=...)(table)`` its
    result table. ``threads``: kernel threads of the local worker (default: all cores) or of each Ray actor
    (default 1). ``progress``: a tqdm bar on stderr (default: only when stderr is a terminal).
    """
    from tqdm import tqdm

    done = store.done()
    pending = [s for s in shards if s.index not in done]
    skipped = sum(s.stop - s.start for s in shards if s.index in done)
    total = sum(s.stop - s.start for s in shards)
    show = sys.stderr.isatty() if progress is None else bool(progress)
    bar = tqdm(total=total, initial=skipped, unit=unit, disable=not show, file=sys.stderr, dynamic_ncols=True,
               desc=store.output.name)
    t0 = time.perf_counter()

    def write(index: int, table) -> None:
        store.write(index, table)
        bar.update(table.num_rows)

    try:
        if backend == "local":
            if pending:
                worker = worker_cls(**worker_kwargs, threads=threads)
                for s in pending:
                    write(s.index, worker(reader(s)))
        else:
            from apr_numba.jobs.ray_backend import run_ray

            run_ray(pending, reader, worker_cls, worker_kwargs, write, address=ray_address, workers=int(workers),
                    threads=int(threads or 1))
    finally:
        bar.close()
    dt = time.perf_counter() - t0
    n = total - skipped
    return {"rows": total, "computed_rows": n, "skipped_rows": skipped, "seconds": dt,
            "rows_per_s": n / dt if dt > 0 and n else 0.0, "backend": backend}
