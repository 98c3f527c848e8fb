"""A cold start compiles the forward's largest kernels in two processes that share Numba's cache (issue 14).

On an empty kernel cache, Numba compiles ``cpu_forward.forward`` and every kernel it calls in one process,
one after another (~40 s of CPU on the AMD EPYC here, measured with compile events: the matrix products
``matmul_auto`` ~15 s, the attention kernels ~8 s, the embedding ~3 s, the forward's own code ~7 s). The
kernels are independent of each other, so :func:`start` launches one background process
(``python -m apr_numba.kernels.precompile matmul``) that compiles the tile products into the cache while
this process packs the model and compiles the BLAS product and the attention, embedding and RoPE kernels
(:func:`finish`); once both are done the forward's own compile loads them from the cache.

The signatures below are the ones the forward calls its kernels with (the packed-matrix tuple is one type for
every quant family, so they do not depend on the model). Should they drift from the forward's, the only cost
is a compile the forward repeats itself: ``tests/test_wheel.py`` checks, after a fresh venv's cold start, that
Numba's cache index of each kernel holds exactly these signatures. Nothing happens when the cache is warm, on
one core, or with ``APR_NUMBA_PARALLEL_COMPILE=0``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

__all__ = ["GROUPS", "cache_is_warm", "compile_group", "finish", "signatures", "start"]

# which kernels each process compiles: the background one the tile products (~10 s) and matmul_auto over
# them, this one the BLAS product first (~3 s, so it is in the cache before the background's matmul_auto
# needs it), then the attention, embedding, RoPE and norm kernels (~11 s)
GROUPS = {"matmul": ("matmul3", "matmul3_serial", "matmul_auto"),
          "local": ("matmul_blas3", "embed_tokens", "attention", "attention_blas", "store_kv", "rope_inplace",
                    "rmsnorm", "rmsnorm_heads")}
WAIT_S = 900


def signatures() -> dict[str, list[tuple]]:
    """{kernel name: [(dispatcher, argument types), ...]} as ``cpu_forward.forward`` calls them."""
    from numba import types as nt

    from apr_numba.kernels import attention, embed, matmul, norm, rope

    f32 = [None] + [nt.Array(nt.float32, n, "C") for n in (1, 2, 3, 4)]
    i64 = nt.int64
    packed = nt.Tuple((i64, i64, nt.Array(nt.uint8, 4, "C"), f32[3], f32[3]))
    mm = (f32[2], f32[2], packed, packed, packed, i64)  # out, X, three matrices, n_mats
    i64a = nt.Array(nt.int64, 1, "C")  # per-token positions / sequences, a layer's fault flags
    att = (f32[2], f32[2], f32[4], f32[4], i64, i64a, i64a, i64a, i64, i64, i64, i64, i64a, f32[3], f32[3])
    att_blas = (f32[2], f32[2], f32[3], f32[3], i64, i64, i64, i64, i64, i64, i64a, f32[3], f32[3])
    return {
        "matmul3": [(matmul.matmul3, mm)],
        "matmul3_serial": [(matmul.matmul3_serial, mm)],
        "matmul_blas3": [(matmul.matmul_blas3, mm)],
        "matmul_auto": [(matmul.matmul_auto, mm)],
        "embed_tokens": [(embed.embed_tokens, (f32[2], nt.Array(nt.uint8, 2, "C", readonly=True),
                                               nt.Array(nt.int64, 1, "C"), i64))],
        "attention": [(attention.attention, att)],
        "attention_blas": [(attention.attention_blas, att_blas)],
        "store_kv": [(attention.store_kv, (f32[4], f32[4], i64, i64a, i64a, f32[2], i64, i64))],
        "rope_inplace": [(rope.rope_inplace, (f32[2], nt.IntegerLiteral(0), i64, i64, i64a, f32[2], f32[2], i64)),
                         (rope.rope_inplace, (f32[2], i64, i64, i64, i64a, f32[2], f32[2], i64))],
        "rmsnorm": [(norm.rmsnorm, (f32[2], f32[2], f32[1], nt.float64))],
        "rmsnorm_heads": [(norm.rmsnorm_heads, (f32[2], nt.IntegerLiteral(0), i64, i64, f32[1], nt.float64)),
                          (norm.rmsnorm_heads, (f32[2], i64, i64, i64, f32[1], nt.float64))],
    }


def cache_is_warm() -> bool:
    """True when Numba's cache folder already holds a compiled ``forward`` (or no cache folder is set)."""
    import numba

    folder = getattr(numba.config, "CACHE_DIR", "")
    if not folder:
        return True
    return any(Path(folder).glob("backends_*/cpu_forward.forward-*.nbi"))


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
