"""The prefill path for long prompts: BLAS sgemm on exactly dequantized row chunks of the packed matrices.

``matmul_blas3(out, X, w0, w1, w2, n_mats)`` has :func:`apr_numba.kernels.matmul.matmul3`'s contract for
T >= :data:`BLAS_MIN_T`; :func:`dequant_rows` decodes row groups of any packed family (float and int8-activation
layouts) to float32 exactly (``s * code - m``), so the only rounding is sgemm's float32 accumulation and the
activations stay float32 in either activation mode.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from apr_numba.quants.blocks import FAMILY_I8V, FAMILY_U4V, FAMILY_U5V
from apr_numba.quants.layouts import FAMILY_I8, FAMILY_U4, FAMILY_U5
from apr_numba.runtime import FASTMATH, clone_function

# Prefill of at least this many tokens goes through BLAS sgemm on dequantized row chunks (ggml-blas does the
# same for large batches): measured 80-100 GMAC/s on 2 cores vs ~20-30 for the interleaved kernel. Below
# 64 tokens dequantizing every matrix costs more than it saves: bench/prefill_cliff.py (AMD EPYC, 2 threads)
# had T = 16-31 at 0.57-0.91x the per-token rate of T = 15 with the switch at 16; from T = 64 the BLAS
# path is ahead of the tile kernel idle and with a competing process (1.13-1.77x of T = 15).
BLAS_MIN_T = 64
# Row groups (of LANES rows) per sgemm task. Each task of one parallel region dequantizes its chunk and calls
# single-threaded sgemm, so Numba's threads (TBB work stealing) are the only pool that runs: OpenBLAS is held
# to one thread by apr_numba.runtime.limit_blas_threads (issue 14: its own threads competing with TBB's made
# a 16-token prompt 9x slower than a 15-token one on a busy machine). Scratch per task: 256 x cols float32.
BLAS_CHUNK_GROUPS = 4


def _dequant_rows(out, w, g0):
    """out (n_groups*LANES, cols) float32 <- rows of row groups g0.. of packed matrix w (exact: s*code - m)."""
    fam, rows, q, s, m = w
    L = s.shape[2]
    n_groups = out.shape[0] // L
    for gi_u in prange(n_groups):
        gi = np.int64(gi_u)
        g = g0 + gi
        for lane in range(L):
            r = gi * L + lane
            if fam == FAMILY_U4:
                for b in range(q.shape[1]):
                    sc = s[g, b, lane]
                    mn = m[g, b, lane]
                    for j in range(16):
                        byte = q[g, b, j, lane]
                        out[r, b * 32 + j] = sc * np.float32(byte & 15) - mn
                        out[r, b * 32 + 16 + j] = sc * np.float32(byte >> 4) - mn
            elif fam == FAMILY_I8:
                k = q.shape[2]
                qi = q.view(np.int8)
                has_m = m.shape[1] > 0
                for b in range(q.shape[1]):
                    sc = s[g, b, lane]
                    mn = m[g, b, lane] if has_m else np.float32(0.0)
                    for j in range(k):
                        out[r, b * k + j] = sc * np.float32(qi[g, b, j, lane]) - mn
            elif fam == FAMILY_U4V or fam == FAMILY_I8V:  # kernels/vnni.py: byte of code j at (j//4)*4L + 4*lane + j%4
                k = q.shape[2]
                has_m = m.shape[1] > 0
                r0 = (lane * 4) // L  # code row and column of this lane's 4 bytes in each 4-row word group
                c0 = (lane * 4) % L
                for b in range(q.shape[1]):
                    sc = s[g, b, lane]
                    mn = m[g, b, lane] if has_m else np.float32(0.0)
                    for jj in range(k // 4):
                        for t in range(4):
                            j = jj * 4 + t
                            byte = np.int64(q[g, b, jj * 4 + r0, c0 + t])
                            if fam == FAMILY_U4V:
                                out[r, b * 32 + j] = sc * np.float32(byte & 15) - mn
                                out[r, b * 32 + 16 + j] = sc * np.float32(byte >> 4) - mn
                            else:
                                out[r, b * k + j] = sc * np.float32(byte - 128) - mn
            elif fam == FAMILY_U5V:  # U4V nibbles + bit-4 masks at 16 L + 16 (jj*4 + c) (+ 8 for the high nibbles)
                has_m = m.shape[1] > 0
                cz = 0 if has_m else 16
                for b in range(q.shape[1]):
                    sc = s[g, b, lane]
                    mn = m[g, b, lane] if has_m else np.float32(0.0)
                    for jj in range(4):
                        for t in range(4):
                            j = jj * 4 + t
                            p = lane * 4 + t  # byte of this code pair within the 4L bytes of word row jj
                            byte = np.int64(q[g, b, jj * 4 + p // L, p % L])
                            mo = 16 * L + (jj * 4 + p // 64) * 16 + (p % 64) // 8
                            bit = (p % 64) % 8
                            b_lo = (np.int64(q[g, b, mo // L, mo % L]) >> bit) & 1
                            b_hi = (np.int64(q[g, b, (mo + 8) // L, (mo + 8) % L]) >> bit) & 1
                            out[r, b * 32 + j] = sc * np.float32((byte & 15) + 16 * b_lo - cz) - mn
                            out[r, b * 32 + 16 + j] = sc * np.float32((byte >> 4) + 16 * b_hi - cz) - mn
            elif fam == FAMILY_U5:
                qw = q.view(np.uint16)
                has_m = m.shape[1] > 0
                cz = 0 if has_m else 16  # Q5_0: w = s*(c - 16) (exact), Q5_1: w = s*c - m
                for b in range(qw.shape[1]):
                    sc = s[g, b, lane]
                    mn = m[g, b, lane] if has_m else np.float32(0.0)
                    o = b * 32
                    for w in range(10):
                        word = np.int64(qw[g, b, w, lane])
                        out[r, o + w] = sc * np.float32((word & 31) - cz) - mn
                        out[r, o + 10 + w] = sc * np.float32(((word >> 5) & 31) - cz) - mn
                        out[r, o + 20 + w] = sc * np.float32((word >> 10) - cz) - mn
                    word = np.int64(qw[g, b, 10, lane])
                    out[r, o + 30] = sc * np.float32((word & 31) - cz) - mn
                    out[r, o + 31] = sc * np.float32((word >> 5) - cz) - mn
            else:
                for c in range(s.shape[1]):
                    out[r, c] = s[g, c, lane]


dequant_rows = njit(parallel=True, fastmath=FASTMATH, nogil=True, cache=True, boundscheck=False)(_dequant_rows)
# The serial copy runs inside the tasks of matmul_blas3 (no nested parallel region).
_dequant_rows_serial = njit(fastmath=FASTMATH, nogil=True, cache=True, boundscheck=False)(
    clone_function(_dequant_rows, "_dequant_rows_serial"))


@njit(parallel=True, fastmath=FASTMATH, nogil=True, cache=True)
def matmul_blas3(out, X, w0, w1, w2, n_mats):
    """out (T, R0 [+ R1 [+ R2]]) <- X (T, cols) @ [W0; W1; W2].T through sgemm (same contract as matmul3).

    One parallel region over chunks of BLAS_CHUNK_GROUPS row groups of all ``n_mats`` matrices together;
    each task dequantizes its chunk exactly (float32 ``s*code - m``) and multiplies it with one sgemm call
    (scipy's OpenBLAS through Numba's ``np.dot``), so the error is float32 sgemm accumulation only.
    """
    C = BLAS_CHUNK_GROUPS
    L = w0[3].shape[2]
    cols = X.shape[1]
    n0 = (w0[3].shape[0] + C - 1) // C
    n1 = (w1[3].shape[0] + C - 1) // C if n_mats > 1 else 0
    n2 = (w2[3].shape[0] + C - 1) // C if n_mats > 2 else 0
    R0 = w0[1]
    R1 = w1[1] if n_mats > 1 else 0
    for task_u in prange(n0 + n1 + n2):
        task = np.int64(task_u)
        if task < n0:
            w = w0
            c = task
            base = 0
        elif task < n0 + n1:
            w = w1
            c = task - n0
            base = R0
        else:
            w = w2
            c = task - n0 - n1
            base = R0 + R1
        rows = w[1]
        g0 = c * C
        ng = min(C, w[3].shape[0] - g0)
        W = np.empty((ng * L, cols), np.float32)
        _dequant_rows_serial(W, w, g0)
        r0 = g0 * L
        r1 = min(rows, r0 + ng * L)
        Y = np.dot(X, W[:r1 - r0].T)
        # an explicit copy: a slice assignment compiles Numba's broadcast-error formatting (~14 s of compile)
        for t in range(Y.shape[0]):
            for r in range(r1 - r0):
                out[t, base + r0 + r] = Y[t, r]
