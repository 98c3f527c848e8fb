"""Token embedding lookup: dequantize single rows straight from the GGUF bytes (memory-mapped).

Only the looked-up rows of ``token_embd`` are ever read, so a 152k-row table costs no resident memory
until used. Row decoders follow ggml's ``dequantize_row_*`` (``ggml/src/ggml-quants.c``) and are
tested bit for bit against ``gguf.quants.dequantize``. Numba has no float16 on the CPU, so
:func:`f16_to_f32` decodes IEEE half bits with integer operations (normals, subnormals, inf, NaN).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit

from apr_numba.runtime import FASTMATH

Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 = int(T.Q8_0), int(T.Q4_0), int(T.Q4_1), int(T.Q5_0), int(T.Q5_1)
Q4_K, Q6_K, F32, F16, BF16 = int(T.Q4_K), int(T.Q6_K), int(T.F32), int(T.F16), int(T.BF16)
EMBED_TYPES = frozenset({Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K, F32, F16, BF16})


@njit(nogil=True, cache=True)
def f16_to_f32(lo, hi):
    """IEEE binary16 from its two little-endian bytes -> float32 (exact)."""
    h = (np.uint32(hi) << 8) | np.uint32(lo)
    sign = (h >> 15) & 1
    exp = (h >> 10) & 0x1F
    man = h & 0x3FF
    if exp == 0:
        v = np.float32(man) * np.float32(2.0**-24)
    elif exp == 31:
        v = np.float32(np.inf) if man == 0 else np.float32(np.nan)
    else:
        v = np.float32((1024 + man) * 2.0 ** (np.int64(exp) - 25))
    return -v if sign else v


@njit(nogil=True, cache=True)
def _u32(b, o):
    return np.uint32(b[o]) | (np.uint32(b[o + 1]) << 8) | (np.uint32(b[o + 2]) << 16) | (np.uint32(b[o + 3]) << 24)


@njit(fastmath=FASTMATH, nogil=True, cache=True, boundscheck=False)
def dequant_row(out, raw, ggml_type):
    """out (cols,) float32 <- the dequantized row whose raw GGML bytes are raw (row_bytes,) uint8."""
    n = out.shape[0]
    if ggml_type == F32:
        for i in range(n):
            out[i] = raw[4 * i:4 * i + 4].view(np.float32)[0]
    elif ggml_type == F16:
        for i in range(n):
            out[i] = f16_to_f32(raw[2 * i], raw[2 * i + 1])
    elif ggml_type == BF16:
        for i in range(n):
            bits = (np.uint32(raw[2 * i + 1]) << 24) | (np.uint32(raw[2 * i]) << 16)
            out[i] = np.array([bits], np.uint32).view(np.float32)[0]
    elif ggml_type == Q8_0:
        for b in range(n // 32):
            o = b * 34
            d = f16_to_f32(raw[o], raw[o + 1])
            for j in range(32):
                out[b * 32 + j] = d * np.float32(np.int8(raw[o + 2 + j]))
    elif ggml_type == Q4_0 or ggml_type == Q4_1:
        ts = 18 if ggml_type == Q4_0 else 20
        for b in range(n // 32):
            o = b * ts
            d = f16_to_f32(raw[o], raw[o + 1])
            mn = -8.0 * d if ggml_type == Q4_0 else f16_to_f32(raw[o + 2], raw[o + 3])
            qo = o + ts - 16
            for j in range(16):
                out[b * 32 + j] = d * np.float32(raw[qo + j] & 15) + mn
                out[b * 32 + 16 + j] = d * np.float32(raw[qo + j] >> 4) + mn
    elif ggml_type == Q5_0 or ggml_type == Q5_1:
        ts = 22 if ggml_type == Q5_0 else 24
        for b in range(n // 32):
            o = b * ts
            d = f16_to_f32(raw[o], raw[o + 1])
            mn = -16.0 * d if ggml_type == Q5_0 else f16_to_f32(raw[o + 2], raw[o + 3])
            qh = _u32(raw, o + ts - 20)
            qo = o + ts - 16
            for j in range(16):
                lo = np.uint32(raw[qo + j] & 15) | (((qh >> j) & 1) << 4)
                hi = np.uint32(raw[qo + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)
                out[b * 32 + j] = d * np.float32(lo) + mn
                out[b * 32 + 16 + j] = d * np.float32(hi) + mn
    elif ggml_type == Q4_K:
        for b in range(n // 256):
            o = b * 144
            d = f16_to_f32(raw[o], raw[o + 1])
            dmin = f16_to_f32(raw[o + 2], raw[o + 3])
            sc = raw[o + 4:o + 16]
            for c in range(4):
                for half in range(2):
                    j = 2 * c + half
                    if j < 4:
                        s, m = sc[j] & 63, sc[j + 4] & 63
                    else:
                        s = (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4)
                        m = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)
                    d1 = d * np.float32(s)
                    m1 = dmin * np.float32(m)
                    for l in range(32):
                        byte = raw[o + 16 + 32 * c + l]
                        q = (byte & 15) if half == 0 else (byte >> 4)
                        out[b * 256 + 32 * j + l] = d1 * np.float32(q) - m1
    elif ggml_type == Q6_K:
        for b in range(n // 256):
            o = b * 210
            d = f16_to_f32(raw[o + 208], raw[o + 209])
            for h in range(2):
                ql = o + 64 * h
                qh = o + 128 + 32 * h
                so = o + 192 + 8 * h
                y = b * 256 + 128 * h
                for l in range(32):
                    isc = l // 16
                    q1 = np.int32((raw[ql + l] & 15) | (((raw[qh + l] >> 0) & 3) << 4)) - 32
                    q2 = np.int32((raw[ql + l + 32] & 15) | (((raw[qh + l] >> 2) & 3) << 4)) - 32
                    q3 = np.int32((raw[ql + l] >> 4) | (((raw[qh + l] >> 4) & 3) << 4)) - 32
                    q4 = np.int32((raw[ql + l + 32] >> 4) | (((raw[qh + l] >> 6) & 3) << 4)) - 32
                    out[y + l] = d * np.float32(np.int8(raw[so + isc])) * np.float32(q1)
                    out[y + l + 32] = d * np.float32(np.int8(raw[so + isc + 2])) * np.float32(q2)
                    out[y + l + 64] = d * np.float32(np.int8(raw[so + isc + 4])) * np.float32(q3)
                    out[y + l + 96] = d * np.float32(np.int8(raw[so + isc + 6])) * np.float32(q4)


@njit(nogil=True, cache=True, boundscheck=False)
def embed_tokens(out, table, tokens, ggml_type):
    """out (T, D) <- rows ``tokens`` (T,) of the raw GGML table (n_vocab, row_bytes) uint8."""
    for t in range(tokens.shape[0]):
        dequant_row(out[t], table[tokens[t]], ggml_type)
