"""Ray Data backend of the corpus jobs: a :class:`~ray.data.Datasource` whose read tasks are the pending
shards, ``map_batches`` over an :class:`~ray.data.ActorPoolStrategy` pool of the job's worker class (each actor
loads the model once, in its constructor), and the driver writing each shard's part file as it arrives.

Ray does the scheduling, the back-pressure and the retries; nothing here schedules work. The result of a
shard does not depend on which actor ran it (the worker is a pure function of the shard's records), and
the part files are named by shard index, so the output equals the local backend's, in the same order.
Ray is an optional extra: ``pip install 'apr-numba[ray]'``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from apr_numba.errors import AprError, ArgumentError
from apr_numba.jobs.shards import INSTALL_HINT, SHARD, Shard


def require_ray():
    """Import ray and ray.data.

    Raises:
        ArgumentError: Ray is not installed (one line saying how to install it).
    """
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ArgumentError(f"the Ray backend needs Ray Data: {INSTALL_HINT}") from exc
    return ray


def _source_class():
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class ShardSource(Datasource):
        """One read task per shard; each returns the shard's records as one pyarrow table."""

        def __init__(self, shards: list[Shard], reader: Callable):
            self._shards, self._reader = shards, reader

        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            def task(s, reader=self._reader):
                return lambda: [reader(s)]

            return [ReadTask(task(s), BlockMetadata(num_rows=s.stop - s.start, size_bytes=None, exec_stats=None,
                                                    input_files=None)) for s in self._shards]

    return ShardSource


def _apr_cause(exc: BaseException) -> AprError | None:
    """The AprError a Ray task raised, found in the chain of wrappers Ray puts around it."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, AprError):
            return e
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


def connect(address: str | None, workers: int, threads: int) -> bool:
    """Join the cluster at ``address`` (``None``/``"local"``: start a local one unless this process already
    joined one). Returns True when this call started Ray (the caller shuts it down).

    Raises:
        ArgumentError: Ray missing, or the cluster has fewer CPUs than ``workers * threads`` (the actors could
            never all start).
    """
    ray = require_ray()
    started = False
    if not ray.is_initialized():
        kw = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if address in (None, "local"):
            kw["num_cpus"] = os.cpu_count() or 1
        else:
            kw["address"] = address
        ray.init(**kw)
        started = True
    cpus = ray.cluster_resources().get("CPU", 0)
    if workers * threads > cpus:
        if started:
            ray.shutdown()
        raise ArgumentError(f"{workers} workers x {threads} threads need {workers * threads} CPUs; the Ray cluster "
                            f"has {cpus:g} (lower --workers or --threads)")
    return started


def run_ray(pending: list[Shard], reader: Callable, worker_cls, worker_kwargs: dict, write: Callable,
            address: str | None = None, workers: int = 2, threads: int = 1) -> None:
    """Run ``worker_cls(**worker_kwargs)`` over the ``pending`` shards on Ray; ``write(index, table)`` is
    called on the driver once per shard with that shard's whole result.

    Each actor reserves ``threads`` CPUs and runs its kernels on that many threads (``worker_kwargs`` gets
    ``threads``); read tasks reserve none (they only parse).

    Raises:
        ArgumentError: Ray missing or too few CPUs; AprError raised by a read task or an actor is re-raised
            as is (not wrapped in Ray's exception types).
    """
    if not pending:
        return
    ray = require_ray()
    started = connect(address, workers, threads)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        ds = ray.data.read_datasource(_source_class()(pending, reader), num_cpus=0, override_num_blocks=len(pending))
        ds = ds.map_batches(worker_cls, fn_constructor_kwargs=dict(worker_kwargs, threads=threads), batch_size=None,
                            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=workers),
                            num_cpus=threads)
        want = {s.index: s.stop - s.start for s in pending}
        parts: dict[int, list] = {}
        import pyarrow as pa
        import pyarrow.compute as pc

        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for k in pc.unique(batch[SHARD]).to_pylist():
                    piece = batch.filter(pc.equal(batch[SHARD], k))
                    parts.setdefault(k, []).append(piece)
                    got = sum(p.num_rows for p in parts[k])
                    if got == want[k]:
                        write(k, pa.concat_tables(parts.pop(k)))
                    elif got > want[k]:
                        raise RuntimeError(f"shard {k}: {got} result rows for {want[k]} records")
        except Exception as exc:  # noqa: BLE001 - unwrap the user-facing error from Ray's wrappers
            cause = _apr_cause(exc)
            if cause is not None:
                raise cause from None
            raise
        if parts:
            raise RuntimeError(f"shards {sorted(parts)} came back incomplete")
    finally:
        if started:
            ray.shutdown()
