"""GGML block layouts and their decoding into integer *codes* plus per-group affine scales.

Every supported quantized type is decoded, losslessly, into the form

    w[r, c] = scale[r, c // group] * code[r, c] - offset[r, c // group]

with ``code`` an 8-bit integer array (rows, cols), ``scale``/``offset`` float32 (rows, cols // group).
The kernels work on that form after :mod:`apr_numba.quants.repack` interleaves it; nothing is
expanded to float32. The block structs and formulas are ggml's (``ggml/src/ggml-common.h`` and
``dequantize_row_*`` in ``ggml/src/ggml-quants.c``); gguf-py's ``gguf/quants.py`` is the NumPy
reference the tests compare against bit for bit (after the float32 scale products).

Block layouts (little-endian; ``half`` is IEEE float16):

* Q8_0, 34 B / 32 values: ``half d; int8 qs[32]`` -> ``w = d * q``.
* Q4_0, 18 B / 32: ``half d; uint8 qs[16]`` (element j: low nibble of qs[j], element j+16: high
  nibble) -> ``w = d * (q - 8)``. 4.5 bits per weight.
* Q4_1, 20 B / 32: ``half d; half m; uint8 qs[16]`` -> ``w = d * q + m``. 5 bpw.
* Q5_0, 22 B / 32: ``half d; uint32 qh; uint8 qs[16]`` (bit j of qh is bit 4 of element j)
  -> ``w = d * (q - 16)``. 5.5 bpw.
* Q5_1, 24 B / 32: ``half d; half m; uint32 qh; uint8 qs[16]`` -> ``w = d * q + m``. 6 bpw.
* Q4_K, 144 B / 256 (super-block of 8 sub-blocks of 32): ``half d; half dmin; uint8 scales[12]``
  (6-bit scale and min per sub-block, ``get_scale_min_k4``) ``; uint8 qs[128]`` (64-value chunk c
  uses qs[32c:32c+32]: low nibbles are sub-block 2c, high nibbles 2c+1)
  -> ``w = d * sc * q - dmin * m``. "Effectively 4.5 bits per weight".
* Q6_K, 210 B / 256 (16 sub-blocks of 16): ``uint8 ql[128]; uint8 qh[64]; int8 scales[16]; half d``
  -> ``w = d * scale * (q - 32)``, q 6-bit. 6.5625 bpw.
* Q2_K, Q3_K, Q5_K, IQ4_NL, IQ4_XS: see :mod:`apr_numba.quants.kquants` (I8 codes, Q5_K as U5 when packed).
* F32, F16, BF16: plain floats (decoded to float32; not quantized).
* aprender's AprQ4 (dtype 128; ``shared/docs/aprender-facts.md``), 18 B / 32 over the flattened tensor
  (last block zero-padded): ``half d; uint8 qs[16]`` with element 2i the low nibble of qs[i] and 2i+1
  the high nibble (not Q4_0's j / j+16 order) -> ``w = d * (q - 8)``, d = max_abs / 7.
* aprender's AprQ8 (dtype 129): one float32 scale for the whole tensor, then int8 values -> ``w = s * q``.
  Both decode to the U4 / I8 families with group 32 when the row is a multiple of 32, else to F32.
"""

from __future__ import annotations

import numpy as np

from apr_numba.errors import ModelFormatError
from apr_numba.quants.blocks import (  # noqa: F401 (re-exported: the layout's vocabulary)
    APR_Q4,
    APR_Q8,
    BLOCKS,
    FAMILY_F32,
    FAMILY_I8,
    FAMILY_U4,
    FAMILY_U5,
    QK_K,
    SUPPORTED_TYPES,
    Codes,
    T,
    _f16,
    _get_scale_min_k4,
    _nibbles_j_j16,
)


def decode_codes(ggml_type: int, data: np.ndarray, shape: tuple[int, int], name: str = "tensor") -> Codes:
    """Decode raw GGML blocks of a 2-D tensor into :class:`Codes`.

    Args:
        ggml_type: GGML type id (``GGMLQuantizationType``).
        data: raw bytes, uint8, any shape with ``rows * row_bytes`` elements (a zero-copy view is fine).
        shape: (rows, cols) in NumPy order (GGUF's ne reversed).
        name: tensor name for error messages.

    Raises:
        ModelFormatError: unsupported type, cols not a multiple of the block size, or wrong byte count.
    """
    if ggml_type in (APR_Q4, APR_Q8):
        return _decode_apr(ggml_type, data, shape, name)
    if ggml_type not in BLOCKS:
        tname = T(ggml_type).name if ggml_type in T._value2member_map_ else str(ggml_type)
        raise ModelFormatError(f"{name}: unsupported quantization type {tname}")
    rows, cols = shape
    bs, ts = BLOCKS[ggml_type]
    if cols % bs:
        raise ModelFormatError(f"{name}: row size ({cols}) is not a multiple of {T(ggml_type).name} "
                               f"block size ({bs})")
    nbytes = rows * (cols // bs) * ts
    raw = np.asarray(data).reshape(-1).view(np.uint8)
    if raw.size != nbytes:
        raise ModelFormatError(f"{name}: {raw.size} bytes for {T(ggml_type).name} {shape}, expected {nbytes}")
    nb = rows * cols // bs
    blocks = raw.reshape(nb, ts)
    t = ggml_type

    if t == T.F32:
        return Codes(FAMILY_F32, t, raw.view("<f4").reshape(rows, cols).astype(np.float32),
                     np.empty((rows, 0), np.float32), None, 1)
    if t == T.F16:
        return Codes(FAMILY_F32, t, raw.view("<f2").reshape(rows, cols).astype(np.float32),
                     np.empty((rows, 0), np.float32), None, 1)
    if t == T.BF16:
        f = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        return Codes(FAMILY_F32, t, f.reshape(rows, cols).copy(), np.empty((rows, 0), np.float32), None, 1)

    if t == T.Q8_0:
        d = _f16(blocks[:, 0:2])
        codes = blocks[:, 2:].view(np.int8)
        return Codes(FAMILY_I8, t, codes.reshape(rows, cols), d.reshape(rows, -1), None, 32)
    if t in (T.Q4_0, T.Q4_1):
        d = _f16(blocks[:, 0:2])
        if t == T.Q4_0:
            off, qs = 8.0 * d, blocks[:, 2:]  # w = d*q - 8d
        else:
            off, qs = -_f16(blocks[:, 2:4]), blocks[:, 4:]  # w = d*q + m
        codes = _nibbles_j_j16(qs)
        return Codes(FAMILY_U4, t, codes.reshape(rows, cols), d.reshape(rows, -1),
                     off.astype(np.float32).reshape(rows, -1), 32)
    if t in (T.Q5_0, T.Q5_1):
        d = _f16(blocks[:, 0:2])
        o = 2 if t == T.Q5_0 else 4
        qh = np.ascontiguousarray(blocks[:, o:o + 4]).view("<u4")  # (nb, 1)
        qs = blocks[:, o + 4:]
        hi = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # (nb, 32)
        q = _nibbles_j_j16(qs) | (hi << 4)
        if t == T.Q5_0:
            codes, off = (q.astype(np.int16) - 16).astype(np.int8), None  # w = d*(q-16)
        else:
            codes, off = q.astype(np.int8), -_f16(blocks[:, 2:4]).reshape(rows, -1)  # w = d*q + m
        return Codes(FAMILY_I8, t, codes.reshape(rows, cols), d.reshape(rows, -1), off, 32)
    if t == T.Q4_K:
        d = _f16(blocks[:, 0:2])[:, None]
        dmin = _f16(blocks[:, 2:4])[:, None]
        sc, mn = _get_scale_min_k4(blocks[:, 4:16])
        qs = blocks[:, 16:].reshape(nb, 4, 32)  # 4 chunks of 64 values
        q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(nb, 256)  # sub-block 2c then 2c+1
        scale = (d * sc.astype(np.float32)).reshape(rows, -1)
        off = (dmin * mn.astype(np.float32)).reshape(rows, -1)
        return Codes(FAMILY_U4, t, q.reshape(rows, cols), scale, off, 32)
    if t == T.Q6_K:
        ql = blocks[:, 0:128].reshape(nb, 2, 64)
        qh = blocks[:, 128:192].reshape(nb, 2, 32)
        sc = blocks[:, 192:208].view(np.int8).astype(np.float32)  # (nb, 16)
        d = _f16(blocks[:, 208:210])[:, None]
        # ggml dequantize_row_q6_K: per 128-value half, l in 0..31:
        #   q1 -> y[l], q2 -> y[l+32], q3 -> y[l+64], q4 -> y[l+96]
        q1 = (ql[:, :, 0:32] & 0x0F) | (((qh >> 0) & 3) << 4)
        q2 = (ql[:, :, 32:64] & 0x0F) | (((qh >> 2) & 3) << 4)
        q3 = (ql[:, :, 0:32] >> 4) | (((qh >> 4) & 3) << 4)
        q4 = (ql[:, :, 32:64] >> 4) | (((qh >> 6) & 3) << 4)
        q = np.concatenate([q1, q2, q3, q4], axis=2).reshape(nb, 256)
        codes = (q.astype(np.int16) - 32).astype(np.int8)
        scale = (d * sc).reshape(rows, -1)  # one scale per 16 values
        return Codes(FAMILY_I8, t, codes.reshape(rows, cols), scale, None, 16)
    from apr_numba.quants.kquants import decode_more

    return decode_more(t, blocks, rows, cols)


def _decode_apr(ggml_type: int, data: np.ndarray, shape: tuple[int, int], name: str) -> Codes:
    """AprQ4 / AprQ8 (see module docstring) -> Codes: U4 / I8 with group 32 when cols % 32 == 0, else F32."""
    rows, cols = shape
    n = rows * cols
    raw = np.asarray(data).reshape(-1).view(np.uint8)
    nbytes = -(-n // 32) * 18 if ggml_type == APR_Q4 else 4 + n
    label = "APR_Q4" if ggml_type == APR_Q4 else "APR_Q8"
    if raw.size != nbytes:
        raise ModelFormatError(f"{name}: {raw.size} bytes for {label} {shape}, expected {nbytes}")
    if ggml_type == APR_Q4:
        blocks = raw.reshape(-1, 18)
        d = _f16(blocks[:, 0:2])
        qs = blocks[:, 2:]
        q = np.stack([qs & 0x0F, qs >> 4], axis=-1).reshape(-1, 32)  # element 2i low, 2i+1 high nibble
        if cols % 32 == 0:
            return Codes(FAMILY_U4, ggml_type, q.reshape(rows, cols), d.reshape(rows, -1),
                         (8.0 * d).astype(np.float32).reshape(rows, -1), 32)
        w = ((q.astype(np.float32) - np.float32(8.0)) * d[:, None]).reshape(-1)[:n]
        return Codes(FAMILY_F32, ggml_type, w.reshape(rows, cols), np.empty((rows, 0), np.float32), None, 1)
    s = raw[:4].copy().view("<f4").astype(np.float32)[0]
    q = raw[4:].view(np.int8).reshape(rows, cols)
    if cols % 32 == 0:
        return Codes(FAMILY_I8, ggml_type, q, np.full((rows, cols // 32), s, np.float32), None, 32)
    return Codes(FAMILY_F32, ggml_type, q.astype(np.float32) * s, np.empty((rows, 0), np.float32), None, 1)
