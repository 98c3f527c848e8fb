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
from numba import njit

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
def _q5k_code(row, o, t, l):
    """Q5_K code of value 32 t + l of the block at ``row[o:]``: low nibble from qs, bit 4 from qh."""
    c = (np.int64(row[o + 48 + 32 * (t >> 1) + l]) >> (4 * (t & 1))) & 15
    return c | (((np.int64(row[o + 16 + l]) >> t) & 1) << 4)


@njit(nogil=True, cache=True)
def pack_k_blocks(raw, ts, nspb, kind, kv, q, s, m):
    """Pack raw blocks into the interleaved arrays; each block's codes and float32 scale / offset products are those
    of apr_numba.quants.layouts / kquants (ggml ``dequantize_row_*``).

    Args:
        raw: uint8 (rows, n_blocks * ts), each row a whole number of blocks of ``ts`` bytes.
        ts, nspb: bytes per block, sub-blocks per block (:data:`KSPEC`).
        kind: K_* constant (type and, for Q5_K, layout).
        kv: uint8 (16,) the IQ4 table (:data:`KVALUES_IQ4NL`) as two's-complement bytes.
        q: uint8, zeroed: U4 (G, nsub, 16, LANES); I8 (G, nsub, group, LANES); U5 (G, nsub, 11, 2 LANES).
        s: float32 (G, nsub, LANES), zeroed. m: float32 (G, nsub, LANES) for Q4_K, Q5_K, Q2_K; else (G, 0, LANES),
            never written.

    Rows past ``rows`` (padding of the last group) are left zero, as :func:`apr_numba.quants.repack.pack` pads.
    Serial and ``nogil``: the loader packs several tensors at once on threads (apr_numba.model.weights); a
    ``prange`` here cost ~3 s more of cold compile (the parfor passes) for no gain at load.
    """
    rows = raw.shape[0]
    G, nsub, k, L = q.shape
    if kind == K_Q5K_U5:
        L = L // 2
    nblk = nsub // nspb
    for g in range(G):
        for lane in range(L):
            r = g * L + lane
            if r >= rows:
                continue
            row = raw[r]
            for b in range(nblk):
                o = b * ts
                sb = b * nspb
                if kind == K_Q4K or kind == K_Q5K_U5 or kind == K_Q5K_I8:
                    d = f16_to_f32(row[o], row[o + 1])
                    dmin = f16_to_f32(row[o + 2], row[o + 3])
                    for j in range(8):  # get_scale_min_k4
                        if j < 4:
                            s6 = np.int64(row[o + 4 + j]) & 63
                            m6 = np.int64(row[o + 8 + j]) & 63
                        else:
                            s6 = (np.int64(row[o + 8 + j]) & 15) | ((np.int64(row[o + j]) >> 6) << 4)
                            m6 = (np.int64(row[o + 8 + j]) >> 4) | ((np.int64(row[o + 4 + j]) >> 6) << 4)
                        s[g, sb + j, lane] = d * np.float32(s6)
                        m[g, sb + j, lane] = dmin * np.float32(m6)
                    if kind == K_Q4K:  # sub-block 2c: low nibbles of qs[32c:32c+32], 2c+1: high nibbles
                        for c in range(4):
                            qs = o + 16 + 32 * c
                            for j in range(16):
                                lo = row[qs + j]
                                hi = row[qs + j + 16]
                                q[g, sb + 2 * c, j, lane] = (lo & np.uint8(15)) | ((hi & np.uint8(15)) << np.uint8(4))
                                q[g, sb + 2 * c + 1, j, lane] = (lo >> np.uint8(4)) | (hi & np.uint8(0xF0))
                    elif kind == K_Q5K_I8:
                        for t in range(8):
                            for l in range(32):
                                q[g, sb + t, l, lane] = np.uint8(_q5k_code(row, o, t, l))
                    else:  # U5 words: c_w + 32 c_{w+10} + 1024 c_{w+20}, word 10 = c_30 + 32 c_31
                        for t in range(8):
                            for w in range(11):
                                if w < 10:
                                    word = (_q5k_code(row, o, t, w) | (_q5k_code(row, o, t, w + 10) << 5)
                                            | (_q5k_code(row, o, t, w + 20) << 10))
                                else:
                                    word = _q5k_code(row, o, t, 30) | (_q5k_code(row, o, t, 31) << 5)
                                q[g, sb + t, w, 2 * lane] = np.uint8(word & 255)
                                q[g, sb + t, w, 2 * lane + 1] = np.uint8(word >> 8)
                elif kind == K_Q6K:
                    d = f16_to_f32(row[o + 208], row[o + 209])
                    for t in range(16):
                        s[g, sb + t, lane] = d * np.float32(np.int8(row[o + 192 + t]))
                    for h in range(2):  # value 128h + 32i + l from ql, qh; code q - 32
                        for l in range(32):
                            a = np.int64(row[o + 64 * h + l])
                            a2 = np.int64(row[o + 64 * h + l + 32])
                            hb = np.int64(row[o + 128 + 32 * h + l])
                            for i in range(4):  # ggml's q1..q4: low / high nibble of ql[l] / ql[l + 32], qh bits 2i
                                x = a2 if i & 1 else a
                                nib = (x >> 4) if i >= 2 else (x & 15)
                                y = 128 * h + 32 * i + l
                                c = (nib | (((hb >> (2 * i)) & 3) << 4)) - 32
                                q[g, sb + (y >> 4), y & 15, lane] = np.uint8(c & 255)
                elif kind == K_Q2K or kind == K_Q3K:
                    if kind == K_Q2K:
                        d = f16_to_f32(row[o + 80], row[o + 81])
                        dmin = f16_to_f32(row[o + 82], row[o + 83])
                        for t in range(16):
                            x = np.int64(row[o + t])
                            s[g, sb + t, lane] = d * np.float32(x & 15)
                            m[g, sb + t, lane] = dmin * np.float32(x >> 4)
                        qs = o + 16
                    else:
                        d = f16_to_f32(row[o + 108], row[o + 109])
                        for t in range(16):
                            lo = (np.int64(row[o + 96 + (t & 7)]) >> (4 * (t >> 3))) & 15
                            hi = (np.int64(row[o + 104 + (t & 3)]) >> (2 * (t >> 2))) & 3
                            s[g, sb + t, lane] = d * np.float32((lo | (hi << 4)) - 32)
                        qs = o + 32
                    for h in range(2):  # value 128h + 32j + l: (qs[32h + l] >> 2j) & 3 (Q3_K: - 4 without hmask bit)
                        for l in range(32):
                            x = np.int64(row[qs + 32 * h + l])
                            hm = np.int64(row[o + l]) >> (4 * h) if kind == K_Q3K else np.int64(15)
                            for j in range(4):
                                c = ((x >> (2 * j)) & 3) - 4 * (1 - ((hm >> j) & 1))
                                v = 128 * h + 32 * j + l
                                q[g, sb + (v >> 4), v & 15, lane] = np.uint8(c & 255)
                elif kind == K_IQ4NL:
                    s[g, sb, lane] = f16_to_f32(row[o], row[o + 1])
                    for j in range(16):
                        x = row[o + 2 + j]
                        q[g, sb, j, lane] = kv[x & np.uint8(15)]
                        q[g, sb, j + 16, lane] = kv[x >> np.uint8(4)]
                else:  # K_IQ4XS
                    d = f16_to_f32(row[o], row[o + 1])
                    shi = np.int64(row[o + 2]) | (np.int64(row[o + 3]) << 8)
                    for t in range(8):
                        lo = (np.int64(row[o + 4 + t // 2]) >> (4 * (t % 2))) & 15
                        hi = (shi >> (2 * t)) & 3
                        s[g, sb + t, lane] = d * np.float32((lo | (hi << 4)) - 32)
                        for j in range(16):
                            x = row[o + 8 + 16 * t + j]
                            q[g, sb + t, j, lane] = kv[x & np.uint8(15)]
                            q[g, sb + t, j + 16, lane] = kv[x >> np.uint8(4)]


KV_IQ4 = KVALUES_IQ4NL.view(np.uint8).copy()  # the table as the int8 codes' bytes
