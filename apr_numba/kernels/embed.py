"""Token embedding lookup: dequantize single rows straight from the GGUF bytes (memory-mapped).

Only the looked-up rows of ``token_embd`` are ever read, so a 152k-row table costs no resident memory
until used (every type of :data:`EMBED_TYPES`). Row decoders follow ggml's ``dequantize_row_*``
(``ggml/src/ggml-quants.c``) and are tested bit for bit against ``gguf.quants.dequantize``. Numba has no
float16 on the CPU, so :func:`f16_to_f32` decodes IEEE half bits with integer operations (normals, subnormals,
inf, NaN).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit

from apr_numba.runtime import FASTMATH

Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 = int(T.Q8_0), int(T.Q4_0), int(T.Q4_1), int(T.Q5_0), int(T.Q5_1)
Q4_K, Q6_K, F32, F16, BF16 = int(T.Q4_K), int(T.Q6_K), int(T.F32), int(T.F16), int(T.BF16)
Q2_K, Q3_K, Q5_K, IQ4_NL, IQ4_XS = int(T.Q2_K), int(T.Q3_K), int(T.Q5_K), int(T.IQ4_NL), int(T.IQ4_XS)
EMBED_TYPES = frozenset({Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K, F32, F16, BF16, Q2_K, Q3_K, Q5_K, IQ4_NL, IQ4_XS})
# ggml kvalues_iq4nl (apr_numba.quants.kquants.KVALUES_IQ4NL), as float32 for the row decoder
_KV_IQ4 = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)


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


@njit(nogil=True, cache=True)
def _scale_min_k4(sc, j):
    """ggml get_scale_min_k4: 6-bit (scale, min) of sub-block j of the 12 packed bytes ``sc`` (Q4_K, Q5_K)."""
    if j < 4:
        return sc[j] & 63, sc[j + 4] & 63
    return (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)


@njit(fastmath=FASTMATH, nogil=True, cache=True, boundscheck=False)
def _dequant_row_more(out, raw, ggml_type):
    """:func:`dequant_row` for Q2_K, Q3_K, Q5_K, IQ4_NL, IQ4_XS (layouts: apr_numba.quants.kquants)."""
    n = out.shape[0]
    if ggml_type == Q2_K or ggml_type == Q3_K:
        ts = 84 if ggml_type == Q2_K else 110
        for b in range(n // 256):
            o = b * ts
            dmin = np.float32(0.0)
            if ggml_type == Q2_K:
                d = f16_to_f32(raw[o + 80], raw[o + 81])
                dmin = f16_to_f32(raw[o + 82], raw[o + 83])
                qo = o + 16
            else:
                d = f16_to_f32(raw[o + 108], raw[o + 109])
                qo = o + 32
            for h in range(2):
                for j in range(4):
                    for half in range(2):
                        i = 8 * h + 2 * j + half  # sub-block of 16 values
                        if ggml_type == Q2_K:
                            dl = d * np.float32(raw[o + i] & 15)
                            ml = dmin * np.float32(raw[o + i] >> 4)
                        else:
                            lo = (raw[o + 96 + (i & 7)] >> (4 * (i >> 3))) & 15
                            hi = (raw[o + 104 + (i & 3)] >> (2 * (i >> 2))) & 3
                            dl = d * np.float32(np.int32(lo | (hi << 4)) - 32)
                            ml = np.float32(0.0)
                        for l16 in range(16):
                            l = 16 * half + l16
                            q = np.int32((raw[qo + 32 * h + l] >> (2 * j)) & 3)
                            if ggml_type == Q3_K and ((raw[o + l] >> (4 * h + j)) & 1) == 0:
                                q -= 4
                            out[b * 256 + 128 * h + 32 * j + l] = dl * np.float32(q) - ml
    elif ggml_type == Q5_K:
        for b in range(n // 256):
            o = b * 176
            d = f16_to_f32(raw[o], raw[o + 1])
            dmin = f16_to_f32(raw[o + 2], raw[o + 3])
            for s in range(8):
                sc, m = _scale_min_k4(raw[o + 4:o + 16], s)
                d1 = d * np.float32(sc)
                m1 = dmin * np.float32(m)
                for l in range(32):
                    q = ((raw[o + 48 + 32 * (s >> 1) + l] >> (4 * (s & 1))) & 15) | (((raw[o + 16 + l] >> s) & 1) << 4)
                    out[b * 256 + 32 * s + l] = d1 * np.float32(q) - m1
    elif ggml_type == IQ4_NL or ggml_type == IQ4_XS:
        bs, ts, qo = (32, 18, 2) if ggml_type == IQ4_NL else (256, 136, 8)
        for b in range(n // bs):
            o = b * ts
            d = f16_to_f32(raw[o], raw[o + 1])
            for s in range(bs // 32):
                dl = d
                if ggml_type == IQ4_XS:
                    lo = (raw[o + 4 + s // 2] >> (4 * (s % 2))) & 15
                    hi = ((np.uint32(raw[o + 2]) | (np.uint32(raw[o + 3]) << 8)) >> (2 * s)) & 3
                    dl = d * np.float32(np.int32(lo | (hi << 4)) - 32)
                q = o + qo + 16 * s
                y = b * bs + 32 * s
                for j in range(16):
                    out[y + j] = dl * _KV_IQ4[raw[q + j] & 15]
                    out[y + j + 16] = dl * _KV_IQ4[raw[q + j] >> 4]


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
                    s, m = _scale_min_k4(sc, j)
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
    else:
        _dequant_row_more(out, raw, ggml_type)


@njit(nogil=True, cache=True, boundscheck=False)
def embed_tokens(out, table, tokens, ggml_type):
    """out (T, D) <- rows ``tokens`` (T,) of the raw GGML table (n_vocab, row_bytes) uint8."""
    for t in range(tokens.shape[0]):
        dequant_row(out[t], table[tokens[t]], ggml_type)
