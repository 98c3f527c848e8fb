"""Quantized matrix products on the row-interleaved layout of :mod:`apr_numba.quants.repack`.

``Y (T, rows) = X (T, cols) @ W.T`` for T = 1 (decode, a matrix-vector product) and T > 1 (prefill).
Activations stay float32; weights are read as 8-bit codes and converted in registers, so the only
rounding is float32 accumulation: the error against the float64 product of the dequantized weights is
bounded by ``cols * 2**-23 * sum_c |w_rc x_c|`` per output (tested with that bound).

Each parallel task is one group of LANES = 64 rows of one matrix (``prange`` over groups, TBB work
stealing or OpenMP), so up to three matrices that read the same input (Q, K, V or gate, up) share one
parallel region and one output buffer laid side by side (aprender's ``qkv_matmul`` stage).

A packed matrix travels as the tuple ``(family, rows, q, s, m)``: family int64, rows int64,
q uint8 (G, nsub, k, LANES) (FAMILY_U5: (G, nsub, 11, 2*LANES), read as ``q.view(uint16)``), s float32
(G, nsub, LANES), m float32 (G, nsub or 0, LANES).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba.typed import List

from apr_numba.kernels.matmul_blas import (  # noqa: F401 (re-exported: one place to import products from)
    BLAS_CHUNK_GROUPS,
    BLAS_MIN_T,
    dequant_rows,
    matmul_blas3,
)
from apr_numba.kernels.vnni import group_dot_q8, quantize_x8
from apr_numba.quants.blocks import FAMILY_U4V
from apr_numba.quants.layouts import FAMILY_I8, FAMILY_U4, FAMILY_U5
from apr_numba.runtime import FASTMATH, clone_function

_C16 = np.float32(16.0)
_C1_16 = np.float32(0.0625)
_C32 = np.float32(32.0)
_C1_32 = np.float32(1.0 / 32.0)
_C1_1024 = np.float32(1.0 / 1024.0)


@njit(fastmath=FASTMATH, nogil=True, cache=True, boundscheck=False)
def _group_dot(fam, q, s, m, g, x, acc, blk):
    """acc (LANES,) <- W[g*LANES:(g+1)*LANES, :] @ x for one row group. blk is (LANES,) scratch."""
    L = acc.shape[0]
    for lane in range(L):
        acc[lane] = 0.0
    if fam == FAMILY_U4:
        # byte j of block b: code j (low nibble), code j+16 (high nibble); w = s*code - m.
        # f*xl + floor(f/16)*(xh - 16 xl) == lo*xl + hi*xh for f = lo + 16 hi (exact in float32).
        for b in range(q.shape[1]):
            for lane in range(L):
                blk[lane] = 0.0
            xs = np.float32(0.0)
            o = b * 32
            for j in range(16):
                xl = x[o + j]
                xh = x[o + 16 + j]
                xd = xh - _C16 * xl
                xs += xl + xh
                for lane in range(L):
                    f = np.float32(q[g, b, j, lane])
                    blk[lane] += f * xl + np.floor(f * _C1_16) * xd
            for lane in range(L):
                acc[lane] += s[g, b, lane] * blk[lane] - m[g, b, lane] * xs
    elif fam == FAMILY_I8:
        k = q.shape[2]
        qi = q.view(np.int8)
        has_m = m.shape[1] > 0
        for b in range(q.shape[1]):
            for lane in range(L):
                blk[lane] = 0.0
            xs = np.float32(0.0)
            o = b * k
            for j in range(k):
                xj = x[o + j]
                xs += xj
                for lane in range(L):
                    blk[lane] += np.float32(qi[g, b, j, lane]) * xj
            if has_m:
                for lane in range(L):
                    acc[lane] += s[g, b, lane] * blk[lane] - m[g, b, lane] * xs
            else:
                for lane in range(L):
                    acc[lane] += s[g, b, lane] * blk[lane]
    elif fam == FAMILY_U5:
        # word w < 10 of a block holds codes w, w+10, w+20 (5 bits each), word 10 codes 30, 31. Split in float32,
        # exactly (small integers): t1 = floor(f/32), t2 = floor(f/1024), codes f - 32 t1, t1 - 32 t2, t2.
        # w = s*c - m (Q5_1), or s*(c - 16) when m is empty (Q5_0).
        qw = q.view(np.uint16)
        has_m = m.shape[1] > 0
        for b in range(qw.shape[1]):
            for lane in range(L):
                blk[lane] = 0.0
            xs = np.float32(0.0)
            o = b * 32
            for w in range(10):
                x0 = x[o + w]
                x1 = x[o + 10 + w]
                x2 = x[o + 20 + w]
                xs += x0 + x1 + x2
                for lane in range(L):
                    f = np.float32(qw[g, b, w, lane])
                    t1 = np.floor(f * _C1_32)
                    t2 = np.floor(f * _C1_1024)
                    blk[lane] += (f - _C32 * t1) * x0 + ((t1 - _C32 * t2) * x1 + t2 * x2)
            x0 = x[o + 30]
            x1 = x[o + 31]
            xs += x0 + x1
            for lane in range(L):
                f = np.float32(qw[g, b, 10, lane])
                t1 = np.floor(f * _C1_32)
                blk[lane] += (f - _C32 * t1) * x0 + t1 * x1
            if has_m:
                for lane in range(L):
                    acc[lane] += s[g, b, lane] * blk[lane] - m[g, b, lane] * xs
            else:
                xs16 = _C16 * xs
                for lane in range(L):
                    acc[lane] += s[g, b, lane] * (blk[lane] - xs16)
    else:  # FAMILY_F32: s holds the weights (G, cols, LANES)
        for c in range(s.shape[1]):
            xc = x[c]
            for lane in range(L):
                acc[lane] += s[g, c, lane] * xc


@njit(fastmath=FASTMATH, nogil=True, cache=True, boundscheck=False)
def _group_dot4(fam, q, s, m, g, X, t0, acc, blk):
    """acc (4, LANES) <- the row group's products with the 4 token rows X[t0:t0+4] (prefill tile, batched decode).

    Same arithmetic per token as :func:`_group_dot` up to the order of the float32 additions (same error
    bound); each weight code is converted once and used for 4 tokens (measured ~1.7x faster per MAC). The
    int8 family takes two code rows (j, j+1) per pass over the lanes, so each load / store of the (4, LANES)
    block accumulator carries 2 multiply-adds per token instead of 1 (measured, one core, weights streamed:
    Q8_0 LM head 1.5 -> 2.2x the mat-vec's per-token rate; the same pairing brought nothing for U4 / U5,
    whose code split already gives each pass 2-3 multiply-adds).
    """
    L = acc.shape[1]
    for r in range(4):
        for lane in range(L):
            acc[r, lane] = 0.0
    x0, x1, x2, x3 = X[t0], X[t0 + 1], X[t0 + 2], X[t0 + 3]
    if fam == FAMILY_U4:
        for b in range(q.shape[1]):
            for r in range(4):
                for lane in range(L):
                    blk[r, lane] = 0.0
            xs0 = xs1 = xs2 = xs3 = np.float32(0.0)
            o = b * 32
            for j in range(16):
                l0, l1, l2, l3 = x0[o + j], x1[o + j], x2[o + j], x3[o + j]
                d0 = x0[o + 16 + j] - _C16 * l0
                d1 = x1[o + 16 + j] - _C16 * l1
                d2 = x2[o + 16 + j] - _C16 * l2
                d3 = x3[o + 16 + j] - _C16 * l3
                xs0 += l0 + x0[o + 16 + j]
                xs1 += l1 + x1[o + 16 + j]
                xs2 += l2 + x2[o + 16 + j]
                xs3 += l3 + x3[o + 16 + j]
                for lane in range(L):
                    f = np.float32(q[g, b, j, lane])
                    hi = np.floor(f * _C1_16)
                    blk[0, lane] += f * l0 + hi * d0
                    blk[1, lane] += f * l1 + hi * d1
                    blk[2, lane] += f * l2 + hi * d2
                    blk[3, lane] += f * l3 + hi * d3
            for lane in range(L):
                sc = s[g, b, lane]
                mn = m[g, b, lane]
                acc[0, lane] += sc * blk[0, lane] - mn * xs0
                acc[1, lane] += sc * blk[1, lane] - mn * xs1
                acc[2, lane] += sc * blk[2, lane] - mn * xs2
                acc[3, lane] += sc * blk[3, lane] - mn * xs3
    elif fam == FAMILY_I8:
        k = q.shape[2]
        qi = q.view(np.int8)
        has_m = m.shape[1] > 0
        for b in range(q.shape[1]):
            for r in range(4):
                for lane in range(L):
                    blk[r, lane] = 0.0
            xs0 = xs1 = xs2 = xs3 = np.float32(0.0)
            o = b * k
            for j in range(k):
                xs0 += x0[o + j]
                xs1 += x1[o + j]
                xs2 += x2[o + j]
                xs3 += x3[o + j]
            for jj in range(k // 2):
                j = 2 * jj
                l0, l1, l2, l3 = x0[o + j], x1[o + j], x2[o + j], x3[o + j]
                e0, e1, e2, e3 = x0[o + j + 1], x1[o + j + 1], x2[o + j + 1], x3[o + j + 1]
                for lane in range(L):
                    f = np.float32(qi[g, b, j, lane])
                    f2 = np.float32(qi[g, b, j + 1, lane])
                    blk[0, lane] += f * l0 + f2 * e0
                    blk[1, lane] += f * l1 + f2 * e1
                    blk[2, lane] += f * l2 + f2 * e2
                    blk[3, lane] += f * l3 + f2 * e3
            if k % 2:  # an odd block length (none of the packed types today)
                j = k - 1
                l0, l1, l2, l3 = x0[o + j], x1[o + j], x2[o + j], x3[o + j]
                for lane in range(L):
                    f = np.float32(qi[g, b, j, lane])
                    blk[0, lane] += f * l0
                    blk[1, lane] += f * l1
                    blk[2, lane] += f * l2
                    blk[3, lane] += f * l3
            for lane in range(L):
                sc = s[g, b, lane]
                mn = m[g, b, lane] if has_m else np.float32(0.0)
                acc[0, lane] += sc * blk[0, lane] - mn * xs0
                acc[1, lane] += sc * blk[1, lane] - mn * xs1
                acc[2, lane] += sc * blk[2, lane] - mn * xs2
                acc[3, lane] += sc * blk[3, lane] - mn * xs3
    elif fam == FAMILY_U5:
        qw = q.view(np.uint16)
        has_m = m.shape[1] > 0
        for b in range(qw.shape[1]):
            for r in range(4):
                for lane in range(L):
                    blk[r, lane] = 0.0
            xs0 = xs1 = xs2 = xs3 = np.float32(0.0)
            o = b * 32
            for w in range(10):
                a0, a1, a2, a3 = x0[o + w], x1[o + w], x2[o + w], x3[o + w]
                b0, b1, b2, b3 = x0[o + 10 + w], x1[o + 10 + w], x2[o + 10 + w], x3[o + 10 + w]
                c0, c1, c2, c3 = x0[o + 20 + w], x1[o + 20 + w], x2[o + 20 + w], x3[o + 20 + w]
                xs0 += a0 + b0 + c0
                xs1 += a1 + b1 + c1
                xs2 += a2 + b2 + c2
                xs3 += a3 + b3 + c3
                for lane in range(L):
                    f = np.float32(qw[g, b, w, lane])
                    t1 = np.floor(f * _C1_32)
                    t2 = np.floor(f * _C1_1024)
                    e0 = f - _C32 * t1
                    e1 = t1 - _C32 * t2
                    blk[0, lane] += e0 * a0 + (e1 * b0 + t2 * c0)
                    blk[1, lane] += e0 * a1 + (e1 * b1 + t2 * c1)
                    blk[2, lane] += e0 * a2 + (e1 * b2 + t2 * c2)
                    blk[3, lane] += e0 * a3 + (e1 * b3 + t2 * c3)
            a0, a1, a2, a3 = x0[o + 30], x1[o + 30], x2[o + 30], x3[o + 30]
            b0, b1, b2, b3 = x0[o + 31], x1[o + 31], x2[o + 31], x3[o + 31]
            xs0 += a0 + b0
            xs1 += a1 + b1
            xs2 += a2 + b2
            xs3 += a3 + b3
            for lane in range(L):
                f = np.float32(qw[g, b, 10, lane])
                t1 = np.floor(f * _C1_32)
                e0 = f - _C32 * t1
                blk[0, lane] += e0 * a0 + t1 * b0
                blk[1, lane] += e0 * a1 + t1 * b1
                blk[2, lane] += e0 * a2 + t1 * b2
                blk[3, lane] += e0 * a3 + t1 * b3
            if has_m:
                for lane in range(L):
                    sc = s[g, b, lane]
                    mn = m[g, b, lane]
                    acc[0, lane] += sc * blk[0, lane] - mn * xs0
                    acc[1, lane] += sc * blk[1, lane] - mn * xs1
                    acc[2, lane] += sc * blk[2, lane] - mn * xs2
                    acc[3, lane] += sc * blk[3, lane] - mn * xs3
            else:  # Q5_0: w = s*(c - 16)
                xs0 *= _C16
                xs1 *= _C16
                xs2 *= _C16
                xs3 *= _C16
                for lane in range(L):
                    sc = s[g, b, lane]
                    acc[0, lane] += sc * (blk[0, lane] - xs0)
                    acc[1, lane] += sc * (blk[1, lane] - xs1)
                    acc[2, lane] += sc * (blk[2, lane] - xs2)
                    acc[3, lane] += sc * (blk[3, lane] - xs3)
    else:
        for c in range(s.shape[1]):
            l0, l1, l2, l3 = x0[c], x1[c], x2[c], x3[c]
            for lane in range(L):
                w = s[g, c, lane]
                acc[0, lane] += w * l0
                acc[1, lane] += w * l1
                acc[2, lane] += w * l2
                acc[3, lane] += w * l3


@njit(nogil=True, cache=True)
def product_tasks(w0, w1, w2, n_mats):
    """The number of parallel tasks (row groups of all ``n_mats`` matrices) of one product."""
    G0 = w0[2].shape[0] if n_mats > 0 else 0
    G1 = w1[2].shape[0] if n_mats > 1 else 0
    G2 = w2[2].shape[0] if n_mats > 2 else 0
    return G0 + G1 + G2


@njit(nogil=True, cache=True)
def needs_q8(w0, w1, w2, n_mats):
    """True when one of the first ``n_mats`` matrices is an int8-activation (VNNI) layout."""
    return (w0[0] >= FAMILY_U4V) or (n_mats > 1 and w1[0] >= FAMILY_U4V) or (n_mats > 2 and w2[0] >= FAMILY_U4V)


@njit(nogil=True, cache=True)
def q8_buffers(X, q8):
    """Scratch for X's int8 blocks (:func:`~apr_numba.kernels.vnni.quantize_x8`): (XW, DX, XS, XI), empty
    when not ``q8``."""
    T = X.shape[0]
    C = X.shape[1] if q8 else 0
    return (np.empty((T, C // 4), np.int32), np.empty((T, C // 32), np.float32), np.empty((T, C // 16), np.float32),
            np.empty((T, C // 16), np.int32))


@njit(fastmath=FASTMATH, nogil=True, cache=True, boundscheck=False)
def product_task(out, X, w0, w1, w2, n_mats, task, xq):
    """Task ``task`` of :func:`_matmul3`: one row group of one matrix, for all T token rows of X.

    ``xq`` is :func:`q8_buffers` of X, filled by ``quantize_x8`` when a matrix is a VNNI layout. The matrix
    products (:func:`matmul3`) and the persistent-worker decode (:mod:`apr_numba.backends.cpu_decode`) both run
    their products through this function.
    """
    T = X.shape[0]
    G0 = w0[2].shape[0] if n_mats > 0 else 0
    G1 = w1[2].shape[0] if n_mats > 1 else 0
    R0 = w0[1]
    R1 = w1[1] if n_mats > 1 else 0
    L = w0[3].shape[2]
    XW, DX, XS, XI = xq
    if task < G0:
        fam, rows, q, s, m = w0
        g = task
        base = 0
    elif task < G0 + G1:
        fam, rows, q, s, m = w1
        g = task - G0
        base = R0
    else:
        fam, rows, q, s, m = w2
        g = task - G0 - G1
        base = R0 + R1
    n_valid = min(L, rows - g * L)
    t = 0
    if fam >= FAMILY_U4V:
        acc4 = np.empty((4, L), np.float32)
        isum = np.empty(4 * L, np.int32)
        while t < T:
            n_tok = 4 if t + 4 <= T else 1
            group_dot_q8(fam, q, s, m, g, XW, DX, XS, XI, t, n_tok, acc4, isum)
            for r in range(n_tok):
                for lane in range(n_valid):
                    out[t + r, base + g * L + lane] = acc4[r, lane]
            t += n_tok
    else:
        if T >= 4:
            acc4 = np.empty((4, L), np.float32)
            blk4 = np.empty((4, L), np.float32)
            while t + 4 <= T:
                _group_dot4(fam, q, s, m, g, X, t, acc4, blk4)
                for r in range(4):
                    for lane in range(n_valid):
                        out[t + r, base + g * L + lane] = acc4[r, lane]
                t += 4
        acc = np.empty(L, np.float32)
        blk = np.empty(L, np.float32)
        while t < T:
            _group_dot(fam, q, s, m, g, X[t], acc, blk)
            for lane in range(n_valid):
                out[t, base + g * L + lane] = acc[lane]
            t += 1


def _matmul3(out, X, w0, w1, w2, n_mats):
    """out (T, R0 [+ R1 [+ R2]]) <- X (T, cols) @ [W0; W1; W2].T for the first ``n_mats`` matrices.

    Matrices are packed tuples (family, rows, q, s, m) with the same ``cols``; unused ones may be
    any packed tuple (they are not read). Parallel over row groups of all matrices together
    (:func:`product_task`).
    """
    # int8 activations for the VNNI families (kernels/vnni.py): quantized once, shared by the matrices
    q8 = needs_q8(w0, w1, w2, n_mats)
    xq = q8_buffers(X, q8)
    if q8:
        quantize_x8(X, xq[0], xq[1], xq[2], xq[3])
    for task_u in prange(product_tasks(w0, w1, w2, n_mats)):
        product_task(out, X, w0, w1, w2, n_mats, np.int64(task_u), xq)


matmul3 = njit(parallel=True, fastmath=FASTMATH, nogil=True, cache=True, boundscheck=False)(_matmul3)
# The same kernel without a parallel region: a TBB region costs ~10-15 us to launch and join here, more
# than the whole product of a small matrix on one core (e.g. 576x576 Q4_1 in ~17 us).
matmul3_serial = njit(fastmath=FASTMATH, nogil=True, cache=True, boundscheck=False)(
    clone_function(_matmul3, "_matmul3_serial"))
# Products below this many multiply-adds run serially (decode of small layers). Measured break-even here.
MIN_PARALLEL_MACS = 600_000

@njit(fastmath=FASTMATH, nogil=True, cache=True)
def matmul_auto(out, X, w0, w1, w2, n_mats):
    """:func:`matmul3` for decode and short prompts; BLAS sgemm on dequantized chunks when T >= BLAS_MIN_T.

    ``n_mats`` is passed on as int64: a literal 1, 2 or 3 at a call site would otherwise make Numba compile
    every kernel below once per literal value (measured: three copies of matmul3, ~30 % of a cold start).
    """
    n = np.int64(n_mats)
    if X.shape[0] < BLAS_MIN_T:
        if out.shape[0] * out.shape[1] * X.shape[1] < MIN_PARALLEL_MACS:
            matmul3_serial(out, X, w0, w1, w2, n)
        else:
            matmul3(out, X, w0, w1, w2, n)
        return
    matmul_blas3(out, X, w0, w1, w2, n)


@njit(fastmath=FASTMATH, nogil=True, cache=True)
def matmul(out, X, w):
    """out (T, rows) <- X (T, cols) @ W.T for one packed matrix ``w``."""
    matmul_auto(out, X, w, w, w, 1)


def packed_tuple(pm):
    """The (family, rows, q, s, m) kernel tuple of a :class:`~apr_numba.quants.repack.PackedMatrix`."""
    return (np.int64(pm.family), np.int64(pm.rows), pm.q, pm.s, pm.m)


@njit(cache=True)
def _list_of(first):
    out = List()
    out.append(first)
    return out


@njit(cache=True)
def _list_append(out, item):
    out.append(item)


def packed_list(tuples):
    """A numba typed List of packed kernel tuples (:func:`packed_tuple`), in order.

    Built by two cached kernels: ``numba.typed.List.append`` called from Python compiles Numba's own
    helpers, which are not cached, on every start (measured ~0.45 s of each warm ``load`` on the AMD EPYC).
    Raises ValueError on an empty sequence (a typed List needs an element to know its type).
    """
    it = iter(tuples)
    try:
        out = _list_of(next(it))
    except StopIteration:
        raise ValueError("packed_list needs at least one matrix") from None
    for t in it:
        _list_append(out, t)
    return out


def matmul_packed(pm, X: np.ndarray) -> np.ndarray:
    """Y (T, rows) float32 = X (T, cols) @ W.T for a PackedMatrix; validates shapes.

    Raises:
        ValueError: if X is not float32 (T, cols).
    """
    X = np.asarray(X)
    if X.ndim == 1:
        X = X[None, :]
    if X.dtype != np.float32 or X.ndim != 2 or X.shape[1] != pm.cols:
        raise ValueError(f"X must be float32 (T, {pm.cols}), got {X.dtype} {X.shape}")
    out = np.empty((X.shape[0], pm.rows), np.float32)
    matmul(out, np.ascontiguousarray(X), packed_tuple(pm))
    return out
