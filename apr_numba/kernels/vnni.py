"""Integer dot products for int8 activations: AVX-512 VNNI ``vpdpbusd`` (u8 x s8 -> i32, 4 products per lane).

The exact path (:mod:`apr_numba.kernels.matmul`) keeps activations in float32 and converts every weight code
to float: 3 vector instructions per 2 multiply-adds for 4-bit codes. This path is llama.cpp's scheme
(``ggml-cpu/arch/x86/quants.c``, ``ggml_vec_dot_q4_1_q8_1`` and friends): the activation row is quantized to
int8 blocks of 32 with one float32 scale each, exactly as ``quantize_row_q8_0`` does (``d = amax / 127``,
``q = round(x / d)``), and each 64-byte vector of weight codes meets 64 int8 activations in one ``vpdpbusd``:
16 lanes x 4 products. Measured (AMD EPYC Zen 5, 2 threads, one 4864x896 U4 mat-vec): ~57 GMAC/s against ~29
for the float path; 18944x3584 (the 7B FFN, streamed from memory): ~40 against ~22.

Layouts (same array shapes as the float families, so the kernels' signatures do not change, only the byte
order inside a block; :func:`apr_numba.quants.vnni_pack.to_vnni` converts a packed matrix):

* FAMILY_U4V (from U4): ``q`` (G, nsub, 16, LANES) uint8 holds, at flat offset ``(jj*LANES + lane)*4 + t`` of
  block (g, b), code ``4jj + t`` of row ``g*LANES + lane`` in the low nibble and code ``16 + 4jj + t`` in the
  high nibble (jj, t in 0..3). ``w = s * code - m``.
* FAMILY_U5V (from U5: Q5_0, Q5_1, Q5_K): ``q`` (G, nsub, 20, LANES) uint8: code rows 0..15 are U4V's nibbles
  of the low 4 bits; rows 16..19 (256 bytes) hold bit 4, as two little-endian 64-bit masks per 64-byte nibble
  vector ``v = jj*4 + c`` at ``1024 + 16 v`` (low nibbles) and ``+ 8`` (high nibbles), bit i for byte i
  (llama.cpp's ``bytes_from_bits_32`` idea; ``vpmovm2b``). 0.625 B/value + scales, against 0.6875 for U5's
  16-bit words. ``w = s * code - m``, or ``s * (code - 16)`` when m is empty (Q5_0).
* FAMILY_I8V (from I8 with k = 16 or 32 codes per block): byte ``(jj*LANES + lane)*4 + t`` = code ``4jj + t``
  plus 128 (so it is unsigned); ``w = s * code - m`` (m empty: no offset). The kernel subtracts
  ``128 * sum(x_q)`` per block, exactly.

Error: the integer sums are exact; the result equals the float64 product of the dequantized weights with the
*quantized* activations ``dx * x_q`` to within float32 accumulation, ``cols * 2**-23 * sum|w x_q|`` (tested).
Against float activations it carries llama.cpp's quantization error (each ``x`` off by up to ``dx / 2``).

Portability: the LLVM intrinsic ``llvm.x86.avx512.vpdpbusd.512`` is emitted only when the CPU Numba compiles
for has ``avx512vnni`` (:func:`target_has_vnni`); elsewhere the same function is built from generic LLVM vector IR
(zero/sign-extend, multiply, add the 4 products), which any target compiles. ``APR_NUMBA_VNNI_IR=generic``
forces the generic IR (the tests check both give the same sums).
"""

from __future__ import annotations

import os

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from apr_numba.quants.blocks import FAMILY_U4V, FAMILY_U5V
from apr_numba.runtime import FASTMATH

_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_V16 = ir.VectorType(_I32, 16)
_B128 = np.int32(128)
_C16 = np.float32(16.0)


def host_has_vnni() -> bool:
    """True when LLVM reports AVX-512 VNNI for this CPU (``vpdpbusd`` on 512-bit vectors)."""
    from llvmlite import binding as llvm

    feats = llvm.get_host_cpu_features()
    return bool(feats.get("avx512vnni", False)) and bool(feats.get("avx512f", False))


def target_has_vnni() -> bool:
    """True when the CPU Numba compiles for has AVX-512 VNNI: ``NUMBA_CPU_FEATURES`` when set (it must list
    ``+avx512vnni``), else False for a named ``NUMBA_CPU_NAME`` other than ``host`` (e.g. the L1 validation's
    ``nehalem``), else the host's own features."""
    import numba

    feats = numba.config.CPU_FEATURES
    if feats:
        return "+avx512vnni" in feats.split(",") and "+avx512f" in feats.split(",")
    name = numba.config.CPU_NAME
    if name and name != "host":
        return False
    return host_has_vnni()


def _use_intrinsic() -> bool:
    return os.environ.get("APR_NUMBA_VNNI_IR", "").strip().lower() != "generic" and target_has_vnni()


def _dpbusd(builder, acc, a, b):
    """acc + per-lane sum of the 4 products u8(a) * s8(b): one ``vpdpbusd`` or the same in generic IR."""
    if _use_intrinsic():
        fnty = ir.FunctionType(_V16, [_V16, _V16, _V16])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpdpbusd.512")
        return builder.call(fn, [acc, a, b])
    v64i8 = ir.VectorType(ir.IntType(8), 64)
    v64i32 = ir.VectorType(_I32, 64)
    ua = builder.zext(builder.bitcast(a, v64i8), v64i32)
    sb = builder.sext(builder.bitcast(b, v64i8), v64i32)
    p = builder.mul(ua, sb)
    undef = ir.Constant(v64i32, ir.Undefined)
    out = acc
    for t in range(4):
        out = builder.add(out, builder.shuffle_vector(p, undef, ir.Constant(_V16, [4 * i + t for i in range(16)])))
    return out


def _broadcast(builder, word):
    v = builder.insert_element(ir.Constant(_V16, ir.Undefined), word, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(_V16, ir.Undefined), ir.Constant(_V16, [0] * 16))


L_BYTES = 64  # LANES: bytes of one code row of a row group


def _bit4(builder, qp, off: int):
    """<16 x i32> whose 64 bytes are 16 where bit i of the little-endian 64-bit mask at ``qp + off`` is set."""
    p = builder.gep(qp, [ir.Constant(_I64, off)])
    bits = builder.load(builder.bitcast(p, _I64.as_pointer()), align=1)
    v64i1 = ir.VectorType(ir.IntType(1), 64)
    v64i8 = ir.VectorType(ir.IntType(8), 64)
    b = builder.zext(builder.bitcast(bits, v64i1), v64i8)
    b = builder.shl(b, ir.Constant(v64i8, [4] * 64))
    return builder.bitcast(b, _V16)


def _make_block_intrinsic(kind: str, n_tok: int):
    """An intrinsic ``f(q, qoff, xw, xoffs..., isum)``: the integer dot products of one block of one 64-row group.

    kind "u4": 16 bytes per lane (32 codes, nibbles); "i8_16" / "i8_32": 16 / 32 bytes per lane (biased by
    128). ``q`` any uint8 array (C-contiguous), ``qoff`` the block's flat byte offset; ``xw`` int32 array of
    the quantized activations as words of 4 int8, ``xoffs`` the word offset of the block's first value for
    each of the ``n_tok`` tokens; ``isum`` int32 array with at least ``n_tok * 64`` elements, written
    token-major (``isum[t*64 + lane]``). Straight-line IR: 4 x n_tok accumulators stay in registers.
    """
    n_words = {"u4": 4, "u5": 4, "i8_16": 4, "i8_32": 8}[kind]  # 4-byte word rows per lane in the block

    def make_sig(q, qoff, xw, offs, isum):
        return types.void(q, qoff, xw, *offs, isum)

    def codegen(context, builder, signature, args):
        qa, qo, xa = args[0], args[1], args[2]
        xos, sa = args[3:3 + n_tok], args[3 + n_tok]
        qarr = context.make_array(signature.args[0])(context, builder, qa)
        xarr = context.make_array(signature.args[2])(context, builder, xa)
        sarr = context.make_array(signature.args[-1])(context, builder, sa)
        qp = builder.gep(qarr.data, [qo])
        xps = [builder.gep(xarr.data, [xo]) for xo in xos]
        mask = ir.Constant(_V16, [0x0F0F0F0F] * 16)
        four = ir.Constant(_V16, [4] * 16)
        zero = ir.Constant(_V16, [0] * 16)
        accs = [[zero] * 4 for _ in range(n_tok)]
        for jj in range(n_words):
            if kind in ("u4", "u5"):
                bl = [_broadcast(builder, builder.load(builder.gep(xp, [ir.Constant(_I64, jj)]))) for xp in xps]
                bh = [_broadcast(builder, builder.load(builder.gep(xp, [ir.Constant(_I64, 4 + jj)]))) for xp in xps]
            else:
                bl = [_broadcast(builder, builder.load(builder.gep(xp, [ir.Constant(_I64, jj)]))) for xp in xps]
            for c in range(4):
                p = builder.gep(qp, [ir.Constant(_I64, (jj * 4 + c) * 64)])
                v = builder.load(builder.bitcast(p, _V16.as_pointer()), align=1)
                if kind in ("u4", "u5"):
                    lo = builder.and_(v, mask)
                    hi = builder.and_(builder.lshr(v, four), mask)
                    if kind == "u5":  # bit 4 of each code from two 64-bit masks after the nibbles (U5V)
                        lo = builder.or_(lo, _bit4(builder, qp, 16 * L_BYTES + (jj * 4 + c) * 16))
                        hi = builder.or_(hi, _bit4(builder, qp, 16 * L_BYTES + (jj * 4 + c) * 16 + 8))
                    for t in range(n_tok):
                        accs[t][c] = _dpbusd(builder, _dpbusd(builder, accs[t][c], lo, bl[t]), hi, bh[t])
                else:
                    for t in range(n_tok):
                        accs[t][c] = _dpbusd(builder, accs[t][c], v, bl[t])
        for t in range(n_tok):
            for c in range(4):
                p = builder.gep(sarr.data, [ir.Constant(_I64, t * 64 + c * 16)])
                builder.store(accs[t][c], builder.bitcast(p, _V16.as_pointer()), align=4)
        return context.get_dummy_value()

    if n_tok == 1:
        def typer(typingctx, q, qoff, xw, o0, isum):
            return make_sig(q, qoff, xw, (o0,), isum), codegen
    else:
        def typer(typingctx, q, qoff, xw, o0, o1, o2, o3, isum):
            return make_sig(q, qoff, xw, (o0, o1, o2, o3), isum), codegen
    typer.__name__ = f"dot_{kind}_t{n_tok}"
    return intrinsic(typer)


_dot_u4_1 = _make_block_intrinsic("u4", 1)
_dot_u4_4 = _make_block_intrinsic("u4", 4)
_dot_u5_1 = _make_block_intrinsic("u5", 1)
_dot_u5_4 = _make_block_intrinsic("u5", 4)
_dot_i16_1 = _make_block_intrinsic("i8_16", 1)
_dot_i16_4 = _make_block_intrinsic("i8_16", 4)
_dot_i32_1 = _make_block_intrinsic("i8_32", 1)
_dot_i32_4 = _make_block_intrinsic("i8_32", 4)


@njit(nogil=True, cache=True, boundscheck=False)  # strict IEEE on purpose: see the docstring
def quantize_x8(X, XW, DX, XS, XI):
    """Quantize activations as ggml's ``quantize_row_q8_0``: per block of 32, ``d = amax / 127``, ``q = round(x/d)``.

    X (T, cols) float32, cols a multiple of 32. Writes XW (T, cols/4) int32 (the int8 codes, 4 per word, in
    order), DX (T, cols/32) float32 scales, XS (T, cols/16) float32 ``d * sum(q)`` per 16 values (the
    offset term of types with a min) and XI (T, cols/16) int32 ``sum(q)`` per 16 (the I8V bias correction).
    Rounding is half away from zero (``roundf``, as ggml's scalar reference).

    Compiled without fast-math: with ``arcp`` / ``contract`` LLVM may turn ``amax / 127`` into a multiply by a
    rounded reciprocal, or fuse ``x * inv + 0.5``, differently in each caller it is inlined into, and a code at
    a rounding tie then differs between two callers (seen: the region forward and the worker decode disagreeing
    by ~1e-3 on smollm2's int8 logits in one long test process). Strict IEEE gives gguf-py's codes everywhere.
    """
    T, C = X.shape
    codes = XW.view(np.int8)
    for t in range(T):
        for b in range(C // 32):
            amax = np.float32(0.0)
            for j in range(32):
                a = abs(X[t, b * 32 + j])
                if a > amax:
                    amax = a
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
            DX[t, b] = d
            for h in range(2):
                si = np.int32(0)
                for j in range(16):
                    v = X[t, b * 32 + h * 16 + j] * inv
                    r = np.int32(np.floor(abs(v) + np.float32(0.5)))
                    if v < 0:
                        r = -r
                    codes[t, b * 32 + h * 16 + j] = r
                    si += r
                XI[t, b * 2 + h] = si
                XS[t, b * 2 + h] = d * np.float32(si)


@njit(fastmath=FASTMATH, nogil=True, cache=True, boundscheck=False)
def group_dot_q8(fam, q, s, m, g, XW, DX, XS, XI, t0, n_tok, acc, isum):
    """acc[:n_tok] (n_tok, LANES) <- the row group g of a U4V / I8V matrix times tokens t0 .. t0+n_tok-1.

    n_tok is 1 (decode) or 4 (the prefill / batched-decode tile); XW, DX, XS, XI as :func:`quantize_x8` wrote
    them; isum int32 (4*LANES,) scratch. Float32 accumulation over blocks: ``acc += s * dx * isum - m * xs``.
    """
    L = acc.shape[1]
    nb = q.shape[1]
    k = q.shape[2]
    per_block = k * L  # bytes of one block of one row group
    has_m = m.shape[1] > 0
    nw = XW.shape[1]
    o = t0 * nw  # flat word offset of token t0 (XW is C-contiguous)
    for r in range(n_tok):
        for lane in range(L):
            acc[r, lane] = 0.0
    for b in range(nb):
        qoff = (g * nb + b) * per_block
        if fam == FAMILY_U4V:
            w0 = b * 8
            if n_tok == 4:
                _dot_u4_4(q, qoff, XW, o + w0, o + nw + w0, o + 2 * nw + w0, o + 3 * nw + w0, isum)
            else:
                _dot_u4_1(q, qoff, XW, o + w0, isum)
            for r in range(n_tok):
                d = DX[t0 + r, b]
                xs = XS[t0 + r, 2 * b] + XS[t0 + r, 2 * b + 1]
                for lane in range(L):
                    acc[r, lane] += s[g, b, lane] * (d * np.float32(isum[r * L + lane])) - m[g, b, lane] * xs
        elif fam == FAMILY_U5V:
            w0 = b * 8
            if n_tok == 4:
                _dot_u5_4(q, qoff, XW, o + w0, o + nw + w0, o + 2 * nw + w0, o + 3 * nw + w0, isum)
            else:
                _dot_u5_1(q, qoff, XW, o + w0, isum)
            for r in range(n_tok):
                d = DX[t0 + r, b]
                xs = XS[t0 + r, 2 * b] + XS[t0 + r, 2 * b + 1]
                if has_m:  # Q5_1, Q5_K: w = s * c - m
                    for lane in range(L):
                        acc[r, lane] += s[g, b, lane] * (d * np.float32(isum[r * L + lane])) - m[g, b, lane] * xs
                else:  # Q5_0: w = s * (c - 16)
                    xs16 = _C16 * xs
                    for lane in range(L):
                        acc[r, lane] += s[g, b, lane] * (d * np.float32(isum[r * L + lane]) - xs16)
        else:  # FAMILY_I8V, k = 16 or 32 codes per block
            if k == 32:
                w0 = b * 8
                if n_tok == 4:
                    _dot_i32_4(q, qoff, XW, o + w0, o + nw + w0, o + 2 * nw + w0, o + 3 * nw + w0, isum)
                else:
                    _dot_i32_1(q, qoff, XW, o + w0, isum)
            else:
                w0 = b * 4
                if n_tok == 4:
                    _dot_i16_4(q, qoff, XW, o + w0, o + nw + w0, o + 2 * nw + w0, o + 3 * nw + w0, isum)
                else:
                    _dot_i16_1(q, qoff, XW, o + w0, isum)
            for r in range(n_tok):
                if k == 32:
                    d = DX[t0 + r, b]
                    bias = _B128 * (XI[t0 + r, 2 * b] + XI[t0 + r, 2 * b + 1])
                    xs = XS[t0 + r, 2 * b] + XS[t0 + r, 2 * b + 1]
                else:
                    d = DX[t0 + r, b // 2]
                    bias = _B128 * XI[t0 + r, b]
                    xs = XS[t0 + r, b]
                if has_m:
                    for lane in range(L):
                        acc[r, lane] += s[g, b, lane] * (d * np.float32(isum[r * L + lane] - bias)) - m[g, b, lane] * xs
                else:
                    for lane in range(L):
                        acc[r, lane] += s[g, b, lane] * (d * np.float32(isum[r * L + lane] - bias))
