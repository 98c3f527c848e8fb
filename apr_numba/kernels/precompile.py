"""A cold start compiles the decoder's largest kernels in two processes that share Numba's cache (issue 14).

On an empty kernel cache, Numba compiles the decoder step ``load`` runs (the persistent-worker decode,
``cpu_decode.forward_workers``) and every kernel it calls in one process, one after another. The kernels are
independent of each other, so :func:`start` launches one background process (``python -m
apr_numba.kernels.precompile matmul``) that compiles the product task (every quant family's tile and int8
kernels, the largest part) and the workers' product step into the cache while this process packs the model
and compiles the attention, embedding, RoPE and norm kernels (:func:`finish`); once both are done the
decoder's own compile loads them from the cache. ``cpu_forward.forward`` (long prompts, tracing) calls the
same task functions, so its own compile, on the first long prompt or in ``apr-numba warmup``, reuses them.

The signatures below are the ones the decoder calls its kernels with (the packed-matrix tuple is one type for
every quant family, so they do not depend on the model). Should they drift, the only cost is a compile the
decoder repeats itself: ``tests/test_wheel.py`` checks, after a fresh venv's cold start, that Numba's cache
index of each kernel holds exactly these signatures. Nothing happens when the cache is warm, on one core, or
with ``APR_NUMBA_PARALLEL_COMPILE=0``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

__all__ = ["GROUPS", "cache_is_warm", "compile_group", "finish", "signatures", "start"]

# which kernels each process compiles: the background one the product task and the workers' product step over
# it, this one the attention, embedding, RoPE and norm kernels
GROUPS = {"matmul": ("product_task", "products"),
          "local": ("embed_tokens", "attention_task", "store_kv", "rope_inplace", "rmsnorm", "rmsnorm_heads")}
WAIT_S = 900


def signatures() -> dict[str, list[tuple]]:
    """{kernel name: [(dispatcher, argument types), ...]} as the persistent-worker decode
    (``cpu_decode.forward_workers``, what ``load`` compiles) calls them; ``cpu_forward.forward`` calls the task,
    embedding, RoPE and norm kernels with the same types."""
    from numba import types as nt

    from apr_numba.backends import cpu_decode
    from apr_numba.kernels import attention, embed, matmul, norm, rope

    f32 = [None] + [nt.Array(nt.float32, n, "C") for n in (1, 2, 3, 4)]
    i64 = nt.int64
    i32_2 = nt.Array(nt.int32, 2, "C")
    packed = nt.Tuple((i64, i64, nt.Array(nt.uint8, 4, "C"), f32[3], f32[3]))
    xq = nt.Tuple((i32_2, f32[2], f32[2], i32_2))  # matmul.q8_buffers
    i64a = nt.Array(nt.int64, 1, "C")  # per-token positions / sequences, a layer's fault flags, step counters
    att = (f32[2], f32[2], f32[4], f32[4], i64, i64a, i64a, i64a, i64, i64, i64, i64, i64a, f32[3], f32[3], i64)
    return {
        "product_task": [(matmul.product_task, (f32[2], f32[2], packed, packed, packed, i64, i64, xq))],
        "products": [(cpu_decode._products, (i64a, i64, f32[2], f32[2], packed, packed, packed, i64, xq))],
        "embed_tokens": [(embed.embed_tokens, (f32[2], nt.Array(nt.uint8, 2, "C", readonly=True),
                                               nt.Array(nt.int64, 1, "C"), i64))],
        "attention_task": [(attention.attention_task, att)],
        "store_kv": [(attention.store_kv, (f32[4], f32[4], i64, i64a, i64a, f32[2], i64, i64))],
        "rope_inplace": [(rope.rope_inplace, (f32[2], nt.IntegerLiteral(0), i64, i64, i64a, f32[2], f32[2], i64)),
                         (rope.rope_inplace, (f32[2], i64, i64, i64, i64a, f32[2], f32[2], i64))],
        "rmsnorm": [(norm.rmsnorm, (f32[2], f32[2], f32[1], nt.float64))],
        "rmsnorm_heads": [(norm.rmsnorm_heads, (f32[2], nt.IntegerLiteral(0), i64, i64, f32[1], nt.float64)),
                          (norm.rmsnorm_heads, (f32[2], i64, i64, i64, f32[1], nt.float64))],
    }


def cache_is_warm() -> bool:
    """True when Numba's cache folder already holds a compiled decoder step, the persistent-worker decode or
    ``cpu_forward.forward`` (or no cache folder is set)."""
    import numba

    folder = getattr(numba.config, "CACHE_DIR", "")
    if not folder:
        return True
    return any(any(Path(folder).glob(f"backends_*/{stem}-*.nbi"))
               for stem in ("cpu_decode.forward_workers", "cpu_forward.forward"))


def compile_group(name: str) -> int:
    """Compile (or load from the cache) the kernels of group ``name``; returns how many signatures were done.

    Raises KeyError for an unknown group. A signature that fails to compile is left to the forward.
    """
    sigs = signatures()
    n = 0
    for kernel in GROUPS[name]:
        for disp, args in sigs[kernel]:
            try:
                disp.compile(args)
                n += 1
            except Exception:  # noqa: BLE001 - the forward compiles it itself then
                pass
    return n


def start() -> subprocess.Popen | None:
    """On a cold cache with >= 2 cores, launch the background process for the ``matmul`` group.

    Returns the process, or None when there is nothing to do (warm cache, one core, disabled).
    """
    if os.environ.get("APR_NUMBA_PARALLEL_COMPILE", "1") == "0" or (os.cpu_count() or 1) < 2:
        return None
    if cache_is_warm():
        return None
    try:
        return subprocess.Popen([sys.executable, "-m", "apr_numba.kernels.precompile", "matmul"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    except OSError:
        return None


def finish(proc: subprocess.Popen | None) -> None:
    """Compile the ``local`` group here, then wait for the background process (killed after WAIT_S s)."""
    if proc is None:
        return
    compile_group("local")
    try:
        proc.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    import apr_numba  # noqa: F401 - sets Numba's cache folder (keyed by the sources) before any kernel import

    compile_group(sys.argv[1])
