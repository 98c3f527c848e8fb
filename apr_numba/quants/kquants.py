"""Decoding of Q2_K, Q3_K, Q5_K, IQ4_NL and IQ4_XS blocks into :class:`~apr_numba.quants.layouts.Codes`.

Same contract as :func:`apr_numba.quants.layouts.decode_codes` (which calls :func:`decode_more` for these
types): ``w = scale * code - offset`` exactly, with float32 ``scale`` / ``offset`` per sub-block, so the
existing kernel families run them unchanged. Block structs are ggml's (``ggml/src/ggml-common.h``), the
formulas ``dequantize_row_q2_K``, ``_q3_K``, ``_q5_K``, ``_iq4_nl``, ``_iq4_xs`` of ``ggml/src/ggml-quants.c``;
gguf-py's ``gguf/quants.py`` computes the same float32 products and is the bit-for-bit reference of the tests.

* Q2_K, 84 B / 256 (16 sub-blocks of 16): ``uint8 scales[16]`` (low nibble: scale, high nibble: min)
  ``; uint8 qs[64]; half d; half dmin``. Value 128h + 32j + l (h < 2, j < 4, l < 32) has the 2-bit code
  ``(qs[32h + l] >> 2j) & 3`` and sub-block 8h + 2j + l // 16 -> ``w = d * sc * q - dmin * m``.
  Decoded as FAMILY_I8, group 16, code q, scale ``d * sc``, offset ``dmin * m``. 2.625 bpw.
* Q3_K, 110 B / 256 (16 sub-blocks of 16): ``uint8 hmask[32]; uint8 qs[64]; uint8 scales[12]; half d``.
  Value 128h + 32j + l: low bits ``(qs[32h + l] >> 2j) & 3``, minus 4 when bit 4h + j of ``hmask[l]`` is
  clear; 6-bit scale ``is`` = ``(scales[is & 7] >> 4 (is >> 3)) & 15 | ((scales[8 + (is & 3)] >> 2 (is >> 2))
  & 3) << 4`` -> ``w = d * (sc - 32) * q``, q in -4..3. FAMILY_I8, group 16, no offset. 3.4375 bpw.
* Q5_K, 176 B / 256 (8 sub-blocks of 32): ``half d; half dmin; uint8 scales[12]`` (as Q4_K,
  ``get_scale_min_k4``) ``; uint8 qh[32]; uint8 qs[128]``. Value 32s + l: ``(qs[32 (s >> 1) + l] >> 4 (s & 1))
  & 15 | ((qh[l] >> s) & 1) << 4`` -> ``w = d * sc * q - dmin * m``. Codes 0..31 with scale ``d * sc`` and
  offset ``dmin * m``: FAMILY_U5 when packed (as Q5_1; FAMILY_I8 with ``APR_NUMBA_Q5_LAYOUT=i8``). 5.5 bpw.
* IQ4_NL, 18 B / 32: ``half d; uint8 qs[16]`` (element j: low nibble of qs[j], j+16: high nibble), values
  through the non-linear table ``kvalues_iq4nl`` (:data:`KVALUES_IQ4NL`) -> ``w = d * kvalues[q]``.
  The table entries are int8, so the *code* is the table value itself (int8) and the scale ``d``: FAMILY_I8,
  group 32, exact (the float32 product ``d * kvalue`` is what ggml and gguf-py compute). 4.5 bpw.
* IQ4_XS, 136 B / 256 (8 sub-blocks of 32): ``half d; uint16 scales_h; uint8 scales_l[4]; uint8 qs[128]``.
  Sub-block s: 6-bit ``ls = (scales_l[s / 2] >> 4 (s % 2)) & 15 | ((scales_h >> 2s) & 3) << 4``, values from
  ``qs[16s .. 16s + 16]`` as IQ4_NL -> ``w = d * (ls - 32) * kvalues[q]``. FAMILY_I8, group 32, code the
  table value, scale ``d * (ls - 32)``. 4.25 bpw.
"""

from __future__ import annotations

import numpy as np

from apr_numba.quants.blocks import FAMILY_I8, Codes, T, _f16, _get_scale_min_k4

# ggml-common.h kvalues_iq4nl (also gguf-py's IQ4_NL.kvalues).
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)

MORE_TYPES = (T.Q2_K, T.Q3_K, T.Q5_K, T.IQ4_NL, T.IQ4_XS)


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """Q2_K / Q3_K 2-bit fields: (nb, 64) uint8 -> (nb, 256) uint8, value 128h + 32j + l = (qs[32h+l] >> 2j) & 3."""
    nb = qs.shape[0]
    shift = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    return ((qs.reshape(nb, 2, 1, 32) >> shift) & 3).reshape(nb, 256)


def _q3_k_scales(scales: np.ndarray) -> np.ndarray:
    """Q3_K's 16 signed scales (sc - 32) from its 12 packed bytes: (nb, 12) uint8 -> (nb, 16) int8."""
    i = np.arange(16)
    lo = (scales[:, i & 7] >> (4 * (i >> 3)).astype(np.uint8)) & 15
    hi = (scales[:, 8 + (i & 3)] >> (2 * (i >> 2)).astype(np.uint8)) & 3
    return ((lo | (hi << 4)).astype(np.int16) - 32).astype(np.int8)


def _iq4_values(qs: np.ndarray) -> np.ndarray:
    """(n, 16) uint8 nibbles -> (n, 32) int8 table values, element j low nibble of qs[j], j+16 high nibble."""
    return KVALUES_IQ4NL[np.concatenate([qs & 0x0F, qs >> 4], axis=-1)]


def decode_more(t: int, blocks: np.ndarray, rows: int, cols: int) -> Codes:
    """Decode (nb, type_size) uint8 blocks of a (rows, cols) tensor of one of :data:`MORE_TYPES` (sizes checked
    by the caller) into :class:`Codes`; see the module docstring for each layout."""
    nb = blocks.shape[0]
    if t == T.Q2_K:
        sc = blocks[:, 0:16]
        d = _f16(blocks[:, 80:82])[:, None]
        dmin = _f16(blocks[:, 82:84])[:, None]
        q = _crumbs(blocks[:, 16:80]).view(np.int8)
        scale = (d * (sc & 0x0F).astype(np.float32)).reshape(rows, -1)
        off = (dmin * (sc >> 4).astype(np.float32)).reshape(rows, -1)
        return Codes(FAMILY_I8, t, q.reshape(rows, cols), scale, off, 16)
    if t == T.Q3_K:
        hbit = ((blocks[:, 0:32].reshape(nb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1)
        q = _crumbs(blocks[:, 32:96]).astype(np.int8) - 4 * (1 - hbit.reshape(nb, 256).astype(np.int8))
        d = _f16(blocks[:, 108:110])[:, None]
        scale = (d * _q3_k_scales(blocks[:, 96:108]).astype(np.float32)).reshape(rows, -1)
        return Codes(FAMILY_I8, t, q.reshape(rows, cols), scale, None, 16)
    if t == T.Q5_K:
        d = _f16(blocks[:, 0:2])[:, None]
        dmin = _f16(blocks[:, 2:4])[:, None]
        sc, mn = _get_scale_min_k4(blocks[:, 4:16])
        qh = blocks[:, 16:48].reshape(nb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)  # (nb, 8, 32)
        qs = blocks[:, 48:176].reshape(nb, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        q = ((qs.reshape(nb, 8, 32) & 0x0F) | ((qh & 1) << 4)).view(np.int8)
        scale = (d * sc.astype(np.float32)).reshape(rows, -1)
        off = (dmin * mn.astype(np.float32)).reshape(rows, -1)
        return Codes(FAMILY_I8, t, q.reshape(rows, cols), scale, off, 32)
    if t == T.IQ4_NL:
        d = _f16(blocks[:, 0:2])
        return Codes(FAMILY_I8, t, _iq4_values(blocks[:, 2:18]).reshape(rows, cols), d.reshape(rows, -1), None, 32)
    if t == T.IQ4_XS:
        d = _f16(blocks[:, 0:2])[:, None]
        sh = np.ascontiguousarray(blocks[:, 2:4]).view("<u2")  # (nb, 1)
        s = np.arange(8)
        lo = (blocks[:, 4 + s // 2] >> (4 * (s % 2)).astype(np.uint8)) & 15
        hi = ((sh >> (2 * s).astype(np.uint16)) & 3).astype(np.uint8)
        ls = (lo | (hi << 4)).astype(np.int16) - 32
        scale = (d * ls.astype(np.float32)).reshape(rows, -1)
        q = _iq4_values(blocks[:, 8:136].reshape(nb * 8, 16))
        return Codes(FAMILY_I8, t, q.reshape(rows, cols), scale, None, 32)
    raise ValueError(f"decode_more: type {t} is not one of {[x.name for x in MORE_TYPES]}")  # pragma: no cover
