"""Serial drivers of the production matmul inner kernel (for WS-003's reference and WS-002's cachegrind runs).

:func:`serial_matvec` is ``matmul3``'s T = 1 (decode) path without ``prange``: the same
:func:`apr_numba.kernels.matmul._group_dot` per row group (every family: U4, I8, U5, F32), in group order, on one
thread. It is what WS-003 compares the parallel kernel with, and what the WS-002 validation runs under cachegrind
(a serial loop needs no threading layer, which keeps the valgrind run small and deterministic).

Numba's cache of this file embeds ``_group_dot`` as compiled then and is keyed on this file only: after a change
to the kernel, clear the caches (``make clean-cache``) or the serial reference runs the old kernel.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from apr_numba.kernels.matmul import _group_dot
from apr_numba.kernels.vnni import group_dot_q8, quantize_x8
from apr_numba.quants.blocks import FAMILY_U4V
from apr_numba.runtime import FASTMATH


@njit(fastmath=FASTMATH, nogil=True, cache=True, boundscheck=False)
def serial_matvec(out, x, w, reps):
    """out (rows,) <- W @ x for a packed kernel tuple ``w`` = (family, rows, q, s, m), ``reps`` times.

    Same per-group arithmetic as ``matmul3`` (T = 1): ``_group_dot`` into ``acc``, then the valid lanes are
    copied to ``out``.
    """
    fam, rows, q, s, m = w
    L = s.shape[2]
    acc = np.empty(L, np.float32)
    blk = np.empty(L, np.float32)
    G = q.shape[0]
    if fam >= FAMILY_U4V:  # int8 activations (kernels/vnni.py), quantized as matmul3 does
        C = x.shape[0]
        X = x.reshape((1, C))
        XW = np.empty((1, C // 4), np.int32)
        DX = np.empty((1, C // 32), np.float32)
        XS = np.empty((1, C // 16), np.float32)
        XI = np.empty((1, C // 16), np.int32)
        acc4 = np.empty((4, L), np.float32)
        isum = np.empty(4 * L, np.int32)
        for _ in range(reps):
            quantize_x8(X, XW, DX, XS, XI)
            for g in range(G):
                group_dot_q8(fam, q, s, m, g, XW, DX, XS, XI, 0, 1, acc4, isum)
                for lane in range(min(L, rows - g * L)):
                    out[g * L + lane] = acc4[0, lane]
        return
    for _ in range(reps):
        for g in range(G):
            _group_dot(fam, q, s, m, g, x, acc, blk)
            n_valid = min(L, rows - g * L)
            for lane in range(n_valid):
                out[g * L + lane] = acc[lane]
