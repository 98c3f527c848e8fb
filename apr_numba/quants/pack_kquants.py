"""Load-time packing of the 256-value K-quants and the IQ4 types straight from their raw GGML blocks (Numba).

One parallel kernel, :func:`pack_k_blocks`, turns rows of raw Q4_K, Q5_K, Q6_K, Q2_K, Q3_K, IQ4_NL or IQ4_XS
blocks into the arrays of a :class:`~apr_numba.quants.repack.PackedMatrix` (layouts in that module's docstring),
byte for byte and bit for bit what ``pack(decode_codes(...))`` (the NumPy decoders of
:mod:`apr_numba.quants.layouts` / :mod:`apr_numba.quants.kquants`, which stay the reference of the tests) gives,
without the decoded ``Codes`` in between. The block layouts and formulas are those modules' (ggml's
``dequantize_row_*`` in ``ggml/src/ggml-quants.c``): a block is decoded into its codes, one float32 scale and
one float32 offset per sub-block, computed with the same single float32 products (``d * float32(sc)``,
``dmin * float32(m)``) as the NumPy path, then written interleaved.

Why: the NumPy decoders allocate several temporaries per tensor and run single-threaded per tensor; for the
synthetic 7B (Q4_K + Q6_K, 4.8 GB) they took ~60 s of a 67 s load on 2 vCPUs of an AMD EPYC.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from apr_numba.kernels.embed import f16_to_f32
from apr_numba.quants.blocks import FAMILY_I8, FAMILY_U4, FAMILY_U5, T
from apr_numba.quants.kquants import KVALUES_IQ4NL

# kernel kinds (the ``kind`` argument of pack_k_blocks)
K_Q4K, K_Q5K_U5, K_Q5K_I8, K_Q6K, K_Q2K, K_Q3K, K_IQ4NL, K_IQ4XS = range(8)

# ggml type -> (values per block, bytes per block, sub-blocks per block, kind for I8 / U4 output, has offsets).
# Q5_K's kind is K_Q5K_U5 or K_Q5K_I8 by layout (see apr_numba.quants.repack.q5_layout).
KSPEC = {int(T.Q4_K): (256, 144, 8, K_Q4K, True), int(T.Q5_K): (256, 176, 8, K_Q5K_I8, True),
         int(T.Q6_K): (256, 210, 16, K_Q6K, False), int(T.Q2_K): (256, 84, 16, K_Q2K, True),
         int(T.Q3_K): (256, 110, 16, K_Q3K, False), int(T.IQ4_NL): (32, 18, 1, K_IQ4NL, False),
         int(T.IQ4_XS): (256, 136, 8, K_IQ4XS, False)}


def family_of(kind: int) -> int:
    """The :class:`PackedMatrix` family a kernel kind writes."""
    return FAMILY_U4 if kind == K_Q4K else FAMILY_U5 if kind == K_Q5K_U5 else FAMILY_I8


@njit(nogil=True, cache=True)
def _decode_block(blk, o, kind, kv, code, sc, mn):
    """Decode one raw block ``blk[o : o + type_size]`` into ``code`` (values, int64), ``sc`` / ``mn`` (float32
    scale / offset per sub-block); formulas of apr_numba.quants.layouts / kquants (ggml dequantize_row_*)."""
    if kind == K_Q4K or kind == K_Q5K_U5 or kind == K_Q5K_I8:
        d = f16_to_f32(blk[o], blk[o + 1])
        dmin = f16_to_f32(blk[o + 2], blk[o + 3])
        for j in range(8):  # get_scale_min_k4
            if j < 4:
                s6 = np.int64(blk[o + 4 + j]) & 63
                m6 = np.int64(blk[o + 8 + j]) & 63
            else:
                s6 = (np.int64(blk[o + 8 + j]) & 15) | ((np.int64(blk[o + j]) >> 6) << 4)
                m6 = (np.int64(blk[o + 8 + j]) >> 4) | ((np.int64(blk[o + 4 + j]) >> 6) << 4)
            sc[j] = d * np.float32(s6)
            mn[j] = dmin * np.float32(m6)
        qs = o + (16 if kind == K_Q4K else 48)
        for t in range(8):
            sh = 4 * (t & 1)
            for l in range(32):
                c = (np.int64(blk[qs + 32 * (t >> 1) + l]) >> sh) & 15
                if kind != K_Q4K:
                    c |= ((np.int64(blk[o + 16 + l]) >> t) & 1) << 4
                code[32 * t + l] = c
    elif kind == K_Q6K:
        d = f16_to_f32(blk[o + 208], blk[o + 209])
        for t in range(16):
            sc[t] = d * np.float32(np.int8(blk[o + 192 + t]))
        for h in range(2):
            for l in range(32):
                a = np.int64(blk[o + 64 * h + l])
                b = np.int64(blk[o + 64 * h + l + 32])
                hb = np.int64(blk[o + 128 + 32 * h + l])
                y = 128 * h + l
                code[y] = ((a & 15) | ((hb & 3) << 4)) - 32
                code[y + 32] = ((b & 15) | (((hb >> 2) & 3) << 4)) - 32
                code[y + 64] = ((a >> 4) | (((hb >> 4) & 3) << 4)) - 32
                code[y + 96] = ((b >> 4) | (((hb >> 6) & 3) << 4)) - 32
    elif kind == K_Q2K or kind == K_Q3K:
        qs = o + (16 if kind == K_Q2K else 32)
        if kind == K_Q2K:
            d = f16_to_f32(blk[o + 80], blk[o + 81])
            dmin = f16_to_f32(blk[o + 82], blk[o + 83])
            for t in range(16):
                b = np.int64(blk[o + t])
                sc[t] = d * np.float32(b & 15)
                mn[t] = dmin * np.float32(b >> 4)
        else:
            d = f16_to_f32(blk[o + 108], blk[o + 109])
            for t in range(16):
                lo = (np.int64(blk[o + 96 + (t & 7)]) >> (4 * (t >> 3))) & 15
                hi = (np.int64(blk[o + 104 + (t & 3)]) >> (2 * (t >> 2))) & 3
                sc[t] = d * np.float32((lo | (hi << 4)) - 32)
        for h in range(2):
            for j in range(4):
                for l in range(32):
                    v = 128 * h + 32 * j + l
                    c = (np.int64(blk[qs + 32 * h + l]) >> (2 * j)) & 3
                    if kind == K_Q3K and ((np.int64(blk[o + l]) >> (4 * h + j)) & 1) == 0:
                        c -= 4
                    code[v] = c
    elif kind == K_IQ4NL:
        sc[0] = f16_to_f32(blk[o], blk[o + 1])
        for j in range(16):
            b = np.int64(blk[o + 2 + j])
            code[j] = kv[b & 15]
            code[j + 16] = kv[b >> 4]
    else:  # K_IQ4XS
        d = f16_to_f32(blk[o], blk[o + 1])
        shi = np.int64(blk[o + 2]) | (np.int64(blk[o + 3]) << 8)
        for t in range(8):
            lo = (np.int64(blk[o + 4 + t // 2]) >> (4 * (t % 2))) & 15
            hi = (shi >> (2 * t)) & 3
            sc[t] = d * np.float32((lo | (hi << 4)) - 32)
            for j in range(16):
                b = np.int64(blk[o + 8 + 16 * t + j])
                code[32 * t + j] = kv[b & 15]
                code[32 * t + j + 16] = kv[b >> 4]


@njit(parallel=True, nogil=True, cache=True)
def pack_k_blocks(raw, ts, nspb, group, kind, kv, q, s, m):
    """Pack raw blocks into the interleaved arrays, in parallel over 64-row groups.

    Args:
        raw: uint8 (rows, n_blocks * ts), each row a whole number of blocks of ``ts`` bytes.
        ts, nspb, group: bytes per block, sub-blocks per block, values per sub-block (:data:`KSPEC`).
        kind: K_* constant (type and, for Q5_K, layout).
        kv: int64 (16,) the IQ4 table (:data:`KVALUES_IQ4NL`).
        q: uint8, zeroed: U4 (G, nsub, 16, LANES); I8 (G, nsub, group, LANES); U5 (G, nsub, 11, 2 LANES).
        s: float32 (G, nsub, LANES), zeroed. m: float32 (G, nsub, LANES), or (G, 0, LANES) for no offsets.

    Rows past ``rows`` (padding of the last group) are left zero, as :func:`apr_numba.quants.repack.pack` pads.
    """
    rows = raw.shape[0]
    G, nsub, k, L = q.shape
    if kind == K_Q5K_U5:
        L = L // 2
    nblk = nsub // nspb
    has_m = m.shape[1] > 0
    for g in prange(G):
        code = np.zeros(256, np.int64)
        sc = np.zeros(16, np.float32)
        mn = np.zeros(16, np.float32)
        for lane in range(L):
            r = g * L + lane
            if r >= rows:
                continue
            for b in range(nblk):
                _decode_block(raw[r], b * ts, kind, kv, code, sc, mn)
                for t in range(nspb):
                    sb = b * nspb + t
                    s[g, sb, lane] = sc[t]
                    if has_m:
                        m[g, sb, lane] = mn[t]
                    c0 = t * group
                    if kind == K_Q4K:
                        for j in range(16):
                            q[g, sb, j, lane] = np.uint8(code[c0 + j] | (code[c0 + j + 16] << 4))
                    elif kind == K_Q5K_U5:
                        for w in range(11):
                            if w < 10:
                                word = code[c0 + w] | (code[c0 + w + 10] << 5) | (code[c0 + w + 20] << 10)
                            else:
                                word = code[c0 + 30] | (code[c0 + 31] << 5)
                            q[g, sb, w, 2 * lane] = np.uint8(word & 255)
                            q[g, sb, w, 2 * lane + 1] = np.uint8(word >> 8)
                    else:
                        for j in range(k):
                            q[g, sb, j, lane] = np.uint8(code[c0 + j] & 255)


KV_IQ4 = KVALUES_IQ4NL.astype(np.int64)
