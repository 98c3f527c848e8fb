"""Process-wide settings for the Numba kernels: fastmath flags, threading layer, thread count.

The threading layer is chosen before the first parallel kernel runs:

* ``tbb`` (Intel TBB, work stealing) when ``libtbb.so.12`` can be loaded. pip installs it into the
  environment's ``lib/`` folder, which is not on the loader path, so it is pre-loaded here with
  ``ctypes`` (``RTLD_GLOBAL``) so that Numba's ``tbbpool`` extension finds it.
* otherwise ``omp`` (OpenMP), then ``workqueue``.

``APR_NUMBA_THREADING=tbb|omp|workqueue`` forces one. :func:`threading_layer` reports the layer that
actually ran (valid once a parallel kernel has executed).
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

# LLVM fast-math flags for the kernels: reassociation lets LLVM vectorize reductions.
# 'nnan'/'ninf' are left out on purpose: a NaN in the activations must stay visible.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
PARALLEL = True

_TBB_LOADED: bool | None = None
_BLAS_LIMITED: int | None = None


def configure_cache_dir() -> str | None:
    """Point Numba's on-disk cache at a folder named by a hash of this package's sources.

    Numba checks only the timestamp of the file that holds a cached function, so a cached ``forward``
    would keep old copies of kernels it calls from other files after those change (seen here: a new weight
    layout silently running through a stale kernel). Keying the folder by the sources of the whole package
    makes any change start a fresh cache. The folder lives under ``$APR_NUMBA_KERNEL_CACHE`` (default
``~/.cache/apr_numba/numba``); ``NUMBA_CACHE_DIR`` set by the user wins. Returns the folder.
    """
    if os.environ.get("NUMBA_CACHE_DIR"):
        return None
    import hashlib

    import numba

    pkg = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(pkg.rglob("*.py")):
        h.update(f.relative_to(pkg).as_posix().encode())
        h.update(f.read_bytes())
    base = Path(os.environ.get("APR_NUMBA_KERNEL_CACHE") or Path.home() / ".cache" / "apr_numba" / "numba")
    folder = base / h.hexdigest()[:16]
    numba.config.CACHE_DIR = str(folder)
    return str(folder)


def _preload_tbb() -> bool:
    """Load libtbb from this Python environment's lib/ folder if present. Returns True if loaded."""
    global _TBB_LOADED
    if _TBB_LOADED is not None:
        return _TBB_LOADED
    candidates = [Path(sys.prefix) / "lib" / "libtbb.so.12", Path(sys.base_prefix) / "lib" / "libtbb.so.12"]
    _TBB_LOADED = False
    for cand in candidates:
        if cand.exists():
            try:
                ctypes.CDLL(str(cand), mode=ctypes.RTLD_GLOBAL)
                _TBB_LOADED = True
                break
            except OSError:
                continue
    if not _TBB_LOADED:
        try:
            ctypes.CDLL("libtbb.so.12", mode=ctypes.RTLD_GLOBAL)
            _TBB_LOADED = True
        except OSError:
            pass
    return _TBB_LOADED


def configure_threading() -> str:
    """Pick Numba's threading layer (before any parallel kernel runs) and hold BLAS to one thread
    (:func:`limit_blas_threads`). Returns the requested layer."""
    import numba

    limit_blas_threads()

    forced = os.environ.get("APR_NUMBA_THREADING", "").strip().lower()
    if forced:
        numba.config.THREADING_LAYER = forced
        if forced == "tbb":
            _preload_tbb()
        return forced
    if _preload_tbb():
        numba.config.THREADING_LAYER_PRIORITY = ["tbb", "omp", "workqueue"]
    else:
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
    numba.config.THREADING_LAYER = "default"
    return "default"


_THREADS_LAUNCHED = False


def launch_threads() -> None:
    """Choose the threading layer (:func:`configure_threading`) and start Numba's thread pool now.

    Needed before the first call of any cached kernel: Numba registers the pool's entry points
    (``do_scheduling`` ...) with the JIT only when the pool starts, and a cached function that reaches a
    ``parallel=True`` kernel through another cached function does not always carry the hook that starts it
    (it is inherited only when the parallel callee was compiled, not loaded, in the process that compiled the
    caller). Such a function, called first in a fresh process, jumped to address 0 (seen: a segfault in
    ``matmul`` in a process whose first kernel call it was). ``apr_numba.kernels`` calls this on import.
    """
    global _THREADS_LAUNCHED
    if _THREADS_LAUNCHED:
        return
    from numba.np.ufunc.parallel import _launch_threads

    configure_threading()
    _launch_threads()
    _THREADS_LAUNCHED = True


def limit_blas_threads(n: int | None = None) -> int:
    """Hold every OpenBLAS pool of the process to ``n`` threads (default ``$APR_NUMBA_BLAS_THREADS``, else 1).

    Prefill at T >= ``kernels.matmul.BLAS_MIN_T`` calls sgemm from inside Numba's parallel tasks, so Numba's
    threads already use every core; an OpenBLAS pool of its own would oversubscribe them (issue 14: 6.6 vs
    92 tok/s for a 37-token prompt on a busy machine). Numba's ``np.dot`` calls scipy's OpenBLAS (through
    ``scipy.linalg.cython_blas``), NumPy has its own: both are limited. scipy's library is usually loaded
    later (on the first sgemm), so ``OPENBLAS_NUM_THREADS`` is set for it, and the pools already loaded are
    limited with threadpoolctl. Idempotent; returns the limit.
    """
    global _BLAS_LIMITED
    if n is None:
        n = int(os.environ.get("APR_NUMBA_BLAS_THREADS", "1") or 1)
    if _BLAS_LIMITED == n:
        return n
    os.environ["OPENBLAS_NUM_THREADS"] = str(n)  # read by an OpenBLAS loaded from now on (scipy's)
    from threadpoolctl import threadpool_limits

    threadpool_limits(n, user_api="blas")  # the pools already loaded (NumPy's); persists for the process
    _BLAS_LIMITED = n
    return n


def threading_layer() -> str:
    """Name of the Numba threading layer in use ('tbb', 'omp', 'workqueue'), or 'unstarted'."""
    import numba

    try:
        return numba.threading_layer()
    except ValueError:
        return "unstarted"


def set_threads(n: int | None) -> int:
    """Set the number of kernel threads (None: all cores Numba sees). Returns the count in use.

    Raises:
        ArgumentError: if ``n`` is < 1.
    """
    import numba

    from apr_numba.errors import ArgumentError

    if n is None:
        n = numba.config.NUMBA_NUM_THREADS
    if n < 1:
        raise ArgumentError(f"--threads must be >= 1, got {n}")
    n = min(int(n), numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(n)
    return n


def clone_function(func, name: str):
    """A copy of a plain Python function under another name, to compile one kernel body twice (e.g. with
    and without ``parallel=True``) while Numba's on-disk cache keeps the two apart (it keys by qualname)."""
    import types

    g = types.FunctionType(func.__code__, func.__globals__, name, func.__defaults__, func.__closure__)
    g.__qualname__ = name
    g.__doc__ = func.__doc__
    return g
