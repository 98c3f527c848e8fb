"""Atomic counters for the persistent-worker decode (:mod:`apr_numba.backends.cpu_decode`).

Numba has no atomics, so these are ``@intrinsic`` functions emitting LLVM's ``atomicrmw add`` (sequentially
consistent: a release of every store before it) and ``load atomic ... acquire`` on an int64 array element, a
spin-wait hint (``pause`` on x86, LLVM ``llvm.x86.sse2.pause``; nothing elsewhere) and libc's ``sched_yield``.
They make the two operations of a work-claiming step (llama.cpp's ``ggml_barrier`` and chunk counter in
``ggml-cpu.c``, ``ggml_graph_compute_thread``)::

    i = claim(ctr, s)            # atomic fetch-and-add on the step's task counter
    while i < n:
        task(i); finish(ctr, s); i = claim(ctr, s)
    wait_done(ctr, s, n)         # spin until the step's done counter reaches n

Deadlock-free whatever the thread pool does: a worker only ever waits for tasks that another worker has claimed
(so is running); a worker that starts late finds the claimed steps finished and catches up, and one worker
alone runs every task.

After :data:`SPIN_BEFORE_YIELD` polls a waiter calls ``sched_yield`` (registered with LLVM by name, so cached
kernels link it again), so that a descheduled peer on a busy machine gets the core back instead of being spun
against.
"""

from __future__ import annotations

import ctypes
import platform

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

_I64 = ir.IntType(64)
_IS_X86 = platform.machine().lower() in {"x86_64", "amd64", "i686", "x86"}
# Polls of a done counter between sched_yield calls (a poll with pause is ~40 cycles on Zen 4 / Sapphire Rapids).
SPIN_BEFORE_YIELD = 400


def _register_sched_yield() -> bool:
    """Make libc's ``sched_yield`` a symbol the JIT links against (by name, so cached kernels stay valid)."""
    from llvmlite import binding as llvm

    try:
        addr = ctypes.cast(ctypes.CDLL(None).sched_yield, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return False
    llvm.add_symbol("sched_yield", addr)
    return True


_HAS_YIELD = _register_sched_yield()


def _ptr(context, builder, arrty, arr, idx):
    ary = context.make_array(arrty)(context, builder, arr)
    return cgutils.get_item_pointer(context, builder, arrty, ary, [idx], wraparound=False)


@intrinsic
def atomic_add(typingctx, arr, idx, val):
    """old = arr[idx]; arr[idx] += val, atomically (seq_cst). arr: int64 1-d C array; idx, val int64."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64 and arr.ndim == 1):
        return None
    sig = types.int64(arr, types.int64, types.int64)

    def codegen(context, builder, sig, args):
        ptr = _ptr(context, builder, sig.args[0], args[0], args[1])
        return builder.atomic_rmw("add", ptr, args[2], "seq_cst")

    return sig, codegen


@intrinsic
def atomic_load(typingctx, arr, idx):
    """arr[idx] read with acquire ordering (later reads see what the writer stored before its release)."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64 and arr.ndim == 1):
        return None
    sig = types.int64(arr, types.int64)

    def codegen(context, builder, sig, args):
        ptr = _ptr(context, builder, sig.args[0], args[0], args[1])
        return builder.load_atomic(ptr, "acquire", 8)

    return sig, codegen


@intrinsic
def cpu_relax(typingctx):
    """The spin-wait hint: x86 ``pause`` (nothing on other targets)."""
    sig = types.void()

    def codegen(context, builder, sig, args):
        if _IS_X86:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def sched_yield(typingctx):
    """libc ``sched_yield()`` (nothing where the symbol was not found)."""
    sig = types.void()

    def codegen(context, builder, sig, args):
        if _HAS_YIELD:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
            builder.call(fn, [])
        return context.get_dummy_value()

    return sig, codegen


# Counter layout of one forward call: step s uses ctr[2 s] (tasks claimed) and ctr[2 s + 1] (tasks done).
@njit(nogil=True, cache=True)
def claim(ctr, s):
    """The next task index of step ``s`` for this worker (>= the step's task count: none left)."""
    return atomic_add(ctr, 2 * s, np.int64(1))


@njit(nogil=True, cache=True)
def finish(ctr, s):
    """Mark one task of step ``s`` done (releases its stores to the waiters)."""
    atomic_add(ctr, 2 * s + 1, np.int64(1))


@njit(nogil=True, cache=True)
def wait_done(ctr, s, n):
    """Spin (pause, then sched_yield every SPIN_BEFORE_YIELD polls) until ``n`` tasks of step ``s`` are done."""
    spins = 0
    while atomic_load(ctr, 2 * s + 1) < n:
        cpu_relax()
        spins += 1
        if spins >= SPIN_BEFORE_YIELD:
            sched_yield()
            spins = 0
