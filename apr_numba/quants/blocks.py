"""The vocabulary of the resident weight layouts: GGML block sizes, the code families the kernels know, the
decoded :class:`Codes` of a matrix, and the bit-unpacking helpers shared by every block decoder
(:mod:`apr_numba.quants.layouts` for the legacy types and Q4_K / Q6_K, :mod:`apr_numba.quants.kquants` for
Q2_K, Q3_K, Q5_K, IQ4_NL, IQ4_XS). Layouts follow ggml's ``ggml-common.h`` / ``ggml-quants.c``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QK_K = 256

T = GGMLQuantizationType
# ggml type id -> (block size in values, type size in bytes), checked against ggml's struct sizes.
BLOCKS = {t: GGML_QUANT_SIZES[t] for t in (T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
                                             T.Q4_K, T.Q6_K, T.Q2_K, T.Q3_K, T.Q5_K, T.IQ4_NL, T.IQ4_XS)}
assert BLOCKS[T.Q8_0] == (32, 2 + 32), "wrong q8_0 block size/padding"
assert BLOCKS[T.Q4_0] == (32, 2 + 16), "wrong q4_0 block size/padding"
assert BLOCKS[T.Q4_1] == (32, 2 + 2 + 16), "wrong q4_1 block size/padding"
assert BLOCKS[T.Q5_0] == (32, 2 + 4 + 16), "wrong q5_0 block size/padding"
assert BLOCKS[T.Q5_1] == (32, 2 + 2 + 4 + 16), "wrong q5_1 block size/padding"
assert BLOCKS[T.Q4_K] == (QK_K, 2 + 2 + 12 + QK_K // 2), "wrong q4_K block size/padding"
assert BLOCKS[T.Q6_K] == (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2), "wrong q6_K block size/padding"

APR_Q4, APR_Q8 = 128, 129  # aprender's own dtypes (apr_numba.formats.apr_format)
SUPPORTED_TYPES = frozenset(BLOCKS) | {APR_Q4, APR_Q8}

# Code families the kernels understand (see repack.py).
FAMILY_U4 = 1  # codes 0..15, packed two per byte (Q4_0, Q4_1, Q4_K)
FAMILY_I8 = 2  # codes -128..127, one per byte (Q8_0, Q5_0, Q5_1, Q6_K, Q2_K, Q3_K, Q5_K, IQ4_NL, IQ4_XS)
FAMILY_F32 = 3  # plain float32 (F32, F16, BF16)
FAMILY_U5 = 4  # codes 0..31, three per 16-bit word (Q5_0, Q5_1, Q5_K when repacked; decode_codes gives I8)
FAMILY_U4V = 5  # U4 codes reordered for int8-activation dot products (kernels/vnni.py)
FAMILY_I8V = 6  # I8 codes + 128 as uint8, reordered for int8-activation dot products (kernels/vnni.py)
FAMILY_U5V = 7  # U5 codes as U4V nibbles + a bit-4 plane, for int8-activation dot products (kernels/vnni.py)


@dataclass
class Codes:
    """A weight matrix decoded to ``w = scale * code - offset`` (see module docstring).

    Attributes:
        family: FAMILY_U4, FAMILY_I8 or FAMILY_F32.
        ggml_type: source GGML type id.
        codes: (rows, cols) uint8 (U4: 0..15), int8 (I8) or float32 (F32: the weights themselves).
        scale: (rows, cols // group) float32; empty for F32.
        offset: (rows, cols // group) float32, or None when every offset is zero.
        group: values per scale (32, or 16 for Q6_K, Q2_K, Q3_K; 1 for F32).
    """

    family: int
    ggml_type: int
    codes: np.ndarray
    scale: np.ndarray
    offset: np.ndarray | None
    group: int

    def dequantize(self) -> np.ndarray:
        """Float32 (rows, cols) weights; for tests and the reference path only."""
        if self.family == FAMILY_F32:
            return self.codes.astype(np.float32)
        rows, cols = self.codes.shape
        c = self.codes.astype(np.float32).reshape(rows, cols // self.group, self.group)
        w = c * self.scale[:, :, None]
        if self.offset is not None:
            w = w - self.offset[:, :, None]
        return w.reshape(rows, cols)


def _f16(b: np.ndarray) -> np.ndarray:
    """(..., 2) uint8 -> (...) float32 from little-endian IEEE half."""
    return np.ascontiguousarray(b).view("<f2")[..., 0].astype(np.float32)


def _nibbles_j_j16(qs: np.ndarray) -> np.ndarray:
    """(n, 16) uint8 -> (n, 32) uint8 codes: element j = low nibble of qs[j], j+16 = high nibble."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _get_scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K 6-bit (scale, min) of the 8 sub-blocks from the 12 packed bytes: (n, 12) -> 2 x (n, 8).

    ggml ``get_scale_min_k4``: for j < 4, sc = q[j] & 63, m = q[j+4] & 63; for j >= 4,
    sc = (q[j+4] & 0xF) | ((q[j-4] >> 6) << 4), m = (q[j+4] >> 4) | ((q[j] >> 6) << 4).
    """
    q = scales.astype(np.uint8)
    sc = np.empty(q.shape[:-1] + (8,), np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4] = q[..., 0:4] & 63
    mn[..., :4] = q[..., 4:8] & 63
    sc[..., 4:] = (q[..., 8:12] & 0x0F) | ((q[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)
    return sc, mn


def u5_words(c: np.ndarray) -> np.ndarray:
    """(..., 32) 5-bit codes -> (..., 11) uint16 FAMILY_U5 words (see the module docstring)."""
    c = c.astype(np.uint16)
    w = np.empty(c.shape[:-1] + (11,), np.uint16)
    w[..., :10] = c[..., 0:10] | (c[..., 10:20] << 5) | (c[..., 20:30] << 10)
    w[..., 10] = c[..., 30] | (c[..., 31] << 5)
    return w


def u5_codes(w: np.ndarray) -> np.ndarray:
    """Inverse of :func:`u5_words`: (..., 11) uint16 -> (..., 32) uint8 codes."""
    w = w.astype(np.uint16)
    return np.concatenate([w[..., :10] & 31, (w[..., :10] >> 5) & 31, w[..., :10] >> 10,
                           w[..., 10:] & 31, w[..., 10:] >> 5], axis=-1).astype(np.uint8)
