"""Repack weights into the row-interleaved kernel layout: :func:`pack_raw` from the raw GGML blocks (Numba; what the
loader runs for every quantized type), :func:`pack` from decoded :class:`~apr_numba.quants.layouts.Codes` (NumPy;
float types, aprender's own, and the reference ``pack_raw`` is tested against).

Why interleave: Numba promotes small integers to int64 and cannot be told which loop to vectorize,
so a per-row dot product over 32-value blocks becomes scalar code (measured here: ~1.5 GMAC/s per
core). Putting ``LANES`` = 64 consecutive output rows side by side makes the innermost loop a
64-wide float32 loop with no reduction, which LLVM vectorizes into four AVX-512 FMAs (~20 GMAC/s per
core measured). This is the idea of llama.cpp's interleaved CPU repacks (``block_q4_0x8``).

Layout of a :class:`PackedMatrix` with ``G = ceil(rows / LANES)`` row groups:

* FAMILY_U4 (Q4_0, Q4_1, Q4_K): ``q`` (G, cols/32, 16, LANES) uint8, byte j of a 32-value block holds
  code j (low nibble) and code j+16 (high nibble); ``s``, ``m`` (G, cols/32, LANES) float32.
* FAMILY_I8 (Q8_0, Q6_K, Q2_K, Q3_K, IQ4_NL, IQ4_XS; Q5_0, Q5_1, Q5_K with ``APR_NUMBA_Q5_LAYOUT=i8``):
  ``q`` (G, cols/group, group, LANES) int8 stored as uint8; ``s`` (G, cols/group, LANES); ``m`` the same
  shape, or (G, 0, LANES) when all offsets are zero.
* FAMILY_U5 (Q5_0, Q5_1, Q5_K; the default, see :func:`q5_layout`): 5-bit codes c_0..c_31 of a 32-value
  block (Q5_0: c = q, w = d * (c - 16); Q5_1: w = d * c + m; Q5_K: w = d sc * c - dmin m per sub-block)
  in 11 little-endian 16-bit words per block and lane:
  word w < 10 = ``c_w + 32 c_{w+10} + 1024 c_{w+20}`` (bit 15 zero), word 10 = ``c_30 + 32 c_31``.
  ``q`` is (G, cols/32, 11, 2*LANES) uint8, i.e. ``q.view(uint16)`` is (G, cols/32, 11, LANES): word w of
  block b of row g*LANES + l at ``[g, b, w, l]``. 22 B + 4 B scale per 32 values = 0.8125 B/value (I8:
  1.125). ``s`` (G, cols/32, LANES) = d (Q5_K: d sc). ``m`` (G, cols/32, LANES) = -m for Q5_1 (Q5_K: dmin m);
  for Q5_0 ``m`` is (G, 0, LANES) and the -16 is implicit: ``w = s * (c - 16)``.
  The kernels split a word in float32, exactly (``f`` < 2**15, so every step is an exact small integer):
  ``t1 = floor(f / 32)``, ``t2 = floor(f / 1024)``, ``c_w = f - 32 t1``, ``c_{w+10} = t1 - 32 t2``,
  ``c_{w+20} = t2`` (no integer ops on lane data: Numba would widen them to int64 lanes).
* FAMILY_F32 (F32/F16/BF16): ``s`` (G, cols, LANES) float32 weights; ``q``, ``m`` empty.

In every case but U5 ``w[g*LANES + l, c] = s[g, c // group, l] * code - m[g, c // group, l]``. Rows past
``rows`` (padding of the last group) are zero and their outputs are never read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from numba import njit

from apr_numba.kernels.embed import f16_to_f32
from apr_numba.quants.blocks import u5_codes, u5_words  # noqa: F401 (re-exported)
from apr_numba.quants.layouts import FAMILY_F32, FAMILY_I8, FAMILY_U4, FAMILY_U5, Codes
from apr_numba.quants.pack_kquants import K_Q5K_I8, K_Q5K_U5, KSPEC, KV_IQ4, family_of, pack_k_blocks

LANES = 64
Q5_TYPES = (6, 7)  # GGML Q5_0, Q5_1 (raw blocks packed by pack_raw)
U5_TYPES = Q5_TYPES + (13,)  # types whose 5-bit codes pack() puts in FAMILY_U5 (Q5_K: like Q5_1, an offset per 32)
U5_WORDS = 11  # 16-bit words per 32-value block in FAMILY_U5
Q5_LAYOUT_ENV = "APR_NUMBA_Q5_LAYOUT"


def q5_layout(layout: str | None = None) -> str:
    """How Q5_0 / Q5_1 matrices are packed: ``"u5"`` (FAMILY_U5, 0.8125 B/value, the default) or ``"i8"``
    (FAMILY_I8, 1.125 B/value). ``layout`` if given, else ``$APR_NUMBA_Q5_LAYOUT``.

    Raises:
        ValueError: an unknown layout name.
    """
    v = (layout if layout is not None else os.environ.get(Q5_LAYOUT_ENV, "")).strip().lower() or "u5"
    if v not in ("u5", "i8"):
        raise ValueError(f"{Q5_LAYOUT_ENV} must be 'u5' or 'i8', got {v!r}")
    return v


@dataclass
class PackedMatrix:
    """A weight matrix W (rows, cols) in the interleaved kernel layout (see module docstring).

    ``as_kernel_tuple()`` gives the ``(family, q, s, m)`` arrays (the kernels take
    ``apr_numba.kernels.matmul.packed_tuple``: ``(family, rows, q, s, m)``).
    ``nbytes`` is the resident size of the packed arrays.
    """

    family: int
    ggml_type: int
    rows: int
    cols: int
    group: int
    q: np.ndarray
    s: np.ndarray
    m: np.ndarray

    def as_kernel_tuple(self) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        return (self.family, self.q, self.s, self.m)

    @property
    def nbytes(self) -> int:
        return int(self.q.nbytes + self.s.nbytes + self.m.nbytes)

    def dequantize(self) -> np.ndarray:
        """Float32 (rows, cols), undoing the interleave; for tests and debugging."""
        if self.family > FAMILY_U5:  # an int8-activation layout (quants/vnni_pack.py)
            from apr_numba.quants.vnni_pack import from_vnni

            return from_vnni(self).dequantize()
        G = self.s.shape[0]
        if self.family == FAMILY_F32:
            w = self.s.transpose(0, 2, 1).reshape(G * LANES, self.cols)
            return w[: self.rows].copy()
        if self.family == FAMILY_U5:
            c = u5_codes(self.q.view(np.uint16).transpose(0, 3, 1, 2)).astype(np.float32)  # (G, LANES, nsub, 32)
            if self.m.shape[1]:
                w = c * self.s.transpose(0, 2, 1)[..., None] - self.m.transpose(0, 2, 1)[..., None]
            else:
                w = (c - np.float32(16.0)) * self.s.transpose(0, 2, 1)[..., None]
            return w.reshape(G * LANES, self.cols)[: self.rows].copy()
        q = self.q.transpose(0, 3, 1, 2)  # (G, LANES, nsub, k)
        if self.family == FAMILY_U4:
            codes = np.concatenate([q & 0x0F, q >> 4], axis=-1).astype(np.float32)
        else:
            codes = q.view(np.int8).astype(np.float32)
        w = codes * self.s.transpose(0, 2, 1)[..., None]
        if self.m.shape[1]:
            w = w - self.m.transpose(0, 2, 1)[..., None]
        return w.reshape(G * LANES, self.cols)[: self.rows].copy()


def _interleave(a: np.ndarray, rows_padded: int) -> np.ndarray:
    """(rows, n, *rest) -> (G, n, *rest, LANES), zero-padding rows up to rows_padded."""
    rows = a.shape[0]
    if rows_padded != rows:
        pad = np.zeros((rows_padded - rows,) + a.shape[1:], a.dtype)
        a = np.concatenate([a, pad], axis=0)
    G = rows_padded // LANES
    a = a.reshape((G, LANES) + a.shape[1:])
    order = (0,) + tuple(range(2, a.ndim)) + (1,)
    return np.ascontiguousarray(a.transpose(order))


def pack(codes: Codes, q5: str | None = None) -> PackedMatrix:
    """Interleave decoded codes into a :class:`PackedMatrix` (lossless). Q5_0 / Q5_1 / Q5_K codes (decoded as I8) go
    to FAMILY_U5 unless ``q5`` / ``$APR_NUMBA_Q5_LAYOUT`` is ``"i8"`` (:func:`q5_layout`)."""
    rows, cols = codes.codes.shape
    rp = -(-rows // LANES) * LANES
    G = rp // LANES
    if codes.family == FAMILY_F32:
        s = _interleave(codes.codes.astype(np.float32, copy=False), rp)  # (G, cols, LANES)
        return PackedMatrix(FAMILY_F32, codes.ggml_type, rows, cols, 1, np.zeros((G, 0, 0, LANES), np.uint8),
                            s, np.zeros((G, 0, LANES), np.float32))
    g = codes.group
    nsub = cols // g
    c = codes.codes.reshape(rows, nsub, g)
    if codes.family == FAMILY_I8 and int(codes.ggml_type) in U5_TYPES and g == 32 and q5_layout(q5) == "u5":
        u = c.astype(np.int16) + (16 if codes.offset is None else 0)  # Q5_0: q - 16 -> q; Q5_1, Q5_K: q
        if u.min(initial=0) < 0 or u.max(initial=0) > 31:
            raise ValueError("Q5 codes out of the 0..31 range")
        q = _interleave(u5_words(u), rp)  # (G, nsub, 11, LANES) uint16
        q = q.view(np.uint8).reshape(G, nsub, U5_WORDS, 2 * LANES)
        s = _interleave(codes.scale.astype(np.float32, copy=False), rp)
        if codes.offset is None:
            m = np.zeros((G, 0, LANES), np.float32)
        else:
            m = _interleave(codes.offset.astype(np.float32, copy=False), rp)
        return PackedMatrix(FAMILY_U5, codes.ggml_type, rows, cols, g, q, s, m)
    if codes.family == FAMILY_U4:
        c = (c[:, :, :16] | (c[:, :, 16:] << 4)).astype(np.uint8)  # (rows, nsub, 16)
    else:
        c = c.view(np.uint8)
    q = _interleave(c, rp)
    s = _interleave(codes.scale.astype(np.float32, copy=False), rp)
    if codes.offset is None:
        m = np.zeros((G, 0, LANES), np.float32)
    else:
        m = _interleave(codes.offset.astype(np.float32, copy=False), rp)
    return PackedMatrix(codes.family, codes.ggml_type, rows, cols, g, q, s, m)


__all__ = ["LANES", "PackedMatrix", "pack", "pack_raw", "q5_layout", "u5_words", "u5_codes",
           "FAMILY_F32", "FAMILY_I8", "FAMILY_U4", "FAMILY_U5"]


# -- fast path: pack raw GGML blocks straight into the interleaved layout (Numba) -----------------------
# Serial and nogil: the loader packs tensors side by side on threads (apr_numba.model.weights). A prange here
# cost ~8 ms a call on 2 busy vCPUs (waking TBB workers; qwen2.5 has ~130 such tensors) and cold-compile time.
# For the 32-value block types the kernel layout is the block's own byte order (U5: the 5-bit codes regrouped
# into 16-bit words), so packing is a gather plus float16 -> float32 scales; the K-quants and IQ4 types are
# decoded block by block (pack_kquants). Bitwise equal to pack(decode_codes(...)) (tested).

@njit(nogil=True, cache=True)
def _pack_b32(raw, ts, qoff, kind, q, s, m):
    """raw (rows, nb*ts) uint8 -> q (G, nb, k, LANES), s/m (G, nb, LANES). kind: 0 Q8_0, 1 Q4_0, 2 Q4_1, 3 Q5_0."""
    rows = raw.shape[0]
    G, nb, k, L = q.shape
    for g in range(G):
        for lane in range(L):
            r = g * L + lane
            if r >= rows:
                continue
            for b in range(nb):
                o = b * ts
                d = f16_to_f32(raw[r, o], raw[r, o + 1])
                s[g, b, lane] = d
                if kind == 1:
                    m[g, b, lane] = np.float32(8.0) * d
                elif kind == 2:
                    m[g, b, lane] = -f16_to_f32(raw[r, o + 2], raw[r, o + 3])
                if kind == 3:  # Q5_0: code = (low nibble | high bit << 4) - 16, stored as int8
                    qh = (np.uint32(raw[r, o + 2]) | (np.uint32(raw[r, o + 3]) << 8) | (np.uint32(raw[r, o + 4]) << 16)
                          | (np.uint32(raw[r, o + 5]) << 24))
                    for j in range(16):
                        byte = raw[r, o + qoff + j]
                        lo = np.int32(byte & 15) | np.int32(((qh >> j) & 1) << 4)
                        hi = np.int32(byte >> 4) | np.int32(((qh >> (j + 16)) & 1) << 4)
                        q[g, b, j, lane] = np.uint8((lo - 16) & 255)
                        q[g, b, j + 16, lane] = np.uint8((hi - 16) & 255)
                else:
                    for j in range(k):
                        q[g, b, j, lane] = raw[r, o + qoff + j]


@njit(nogil=True, cache=True)
def _pack_q5_u5(raw, ts, has_m, q, s, m):
    """raw Q5_0 (has_m False) / Q5_1 blocks (rows, nb*ts) -> FAMILY_U5: q (G, nb, 11, 2*LANES) uint8 (uint16
    words), s, m (G, nb or 0, LANES)."""
    rows = raw.shape[0]
    qw = q.view(np.uint16)
    G, nb, nw, L = qw.shape
    oh = 4 if has_m else 2  # qh (uint32), then qs[16]
    for g in range(G):
        for lane in range(L):
            r = g * L + lane
            if r >= rows:
                continue
            for b in range(nb):
                o = b * ts
                s[g, b, lane] = f16_to_f32(raw[r, o], raw[r, o + 1])
                if has_m:
                    m[g, b, lane] = -f16_to_f32(raw[r, o + 2], raw[r, o + 3])
                qh = (np.int64(raw[r, o + oh]) | (np.int64(raw[r, o + oh + 1]) << 8)
                      | (np.int64(raw[r, o + oh + 2]) << 16) | (np.int64(raw[r, o + oh + 3]) << 24))
                qs = o + oh + 4
                for w in range(nw):
                    word = np.int64(0)
                    for p in range(3 if w < 10 else 2):
                        j = w + 10 * p if w < 10 else 30 + p
                        byte = np.int64(raw[r, qs + (j & 15)])
                        nib = (byte >> 4) if j >= 16 else (byte & 15)
                        word |= (nib | (((qh >> j) & 1) << 4)) << (5 * p)
                    qw[g, b, w, lane] = np.uint16(word)


_FAST = {int(T8): spec for T8, spec in ((8, (34, 2, 0, 32, False)), (2, (18, 2, 1, 16, True)),
                                          (3, (20, 4, 2, 16, True)), (6, (22, 6, 3, 32, False)))}


SPLIT_BYTES = 32 << 20  # raw bytes above which pack_raw(threads > 1) packs one matrix on several threads


def _launch(kernel, raw2: np.ndarray, args: tuple, q: np.ndarray, s: np.ndarray, m: np.ndarray, threads: int) -> None:
    """``kernel(raw2, *args, q, s, m)``; a matrix over :data:`SPLIT_BYTES` in up to ``threads`` chunks of row groups
    on threads (the kernels are serial and nogil, and a chunk is the same C-contiguous array type). Without this
    a big LM head alone on one core is the end of the load (gemma3's 262k x 640 Q8_0: 0.61 s against 0.29 s)."""
    G = q.shape[0]
    n = min(int(threads), G, raw2.nbytes // SPLIT_BYTES + 1)
    if n <= 1:
        kernel(raw2, *args, q, s, m)
        return
    from concurrent.futures import ThreadPoolExecutor

    cuts = [G * i // n for i in range(n + 1)]
    with ThreadPoolExecutor(n, thread_name_prefix="apr-pack-rows") as ex:
        futs = [ex.submit(kernel, raw2[a * LANES:b * LANES], *args, q[a:b], s[a:b], m[a:b])
                for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        for f in futs:
            f.result()


def pack_raw(ggml_type: int, raw: np.ndarray, shape: tuple[int, int], q5: str | None = None,
             threads: int = 1) -> PackedMatrix | None:
    """Pack the raw GGML blocks of a (rows, cols) matrix straight into a :class:`PackedMatrix`, bit for bit as
    ``pack(decode_codes(...))`` would (``q5`` as there), in parallel Numba: Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1
    here, Q4_K, Q5_K, Q6_K, Q2_K, Q3_K, IQ4_NL, IQ4_XS in :mod:`apr_numba.quants.pack_kquants`.

    Args:
        raw: uint8 with ``rows * row_bytes`` elements, any shape (a read-only memory map is fine).
        threads: threads one matrix over :data:`SPLIT_BYTES` may be packed on (the loader passes its pool size).

    Returns:
        the packed matrix, or None for the other types (F32 / F16 / BF16, aprender's own), which go through
        :func:`pack`.
    """
    rows, cols = shape
    t = int(ggml_type)
    G = -(-rows // LANES)
    if t in Q5_TYPES and q5_layout(q5) == "u5":
        has_m = t == 7
        nb = cols // 32
        raw2 = np.asarray(raw).reshape(rows, nb * (24 if has_m else 22))
        q = np.zeros((G, nb, U5_WORDS, 2 * LANES), np.uint8)
        s = np.zeros((G, nb, LANES), np.float32)
        m = np.zeros((G, nb if has_m else 0, LANES), np.float32)
        _launch(_pack_q5_u5, raw2, (24 if has_m else 22, has_m), q, s, m, threads)
        return PackedMatrix(FAMILY_U5, t, rows, cols, 32, q, s, m)
    if t in KSPEC:
        return _pack_k(t, raw, rows, cols, G, q5, threads)
    spec = _FAST.get(t)
    if spec is None:
        return None
    ts, qoff, kind, k, has_m = spec
    nb = cols // 32
    raw2 = np.asarray(raw).reshape(rows, nb * ts)
    q = np.zeros((G, nb, k, LANES), np.uint8)
    s = np.zeros((G, nb, LANES), np.float32)
    m = np.zeros((G, nb if has_m else 0, LANES), np.float32)
    _launch(_pack_b32, raw2, (ts, qoff, kind), q, s, m, threads)
    family = FAMILY_U4 if kind in (1, 2) else FAMILY_I8
    return PackedMatrix(family, t, rows, cols, 32, q, s, m)


def _pack_k(t: int, raw: np.ndarray, rows: int, cols: int, G: int, q5: str | None, threads: int) -> PackedMatrix:
    """K-quant / IQ4 blocks -> PackedMatrix through :func:`~apr_numba.quants.pack_kquants.pack_k_blocks`."""
    bs, ts, nspb, kind, has_m = KSPEC[t]
    if kind == K_Q5K_I8 and q5_layout(q5) == "u5":
        kind = K_Q5K_U5
    group = bs // nspb
    nsub = cols // group
    raw2 = np.asarray(raw).reshape(rows, cols // bs * ts)
    family = family_of(kind)
    k = 16 if family == FAMILY_U4 else group
    q = np.zeros((G, nsub, U5_WORDS, 2 * LANES) if family == FAMILY_U5 else (G, nsub, k, LANES), np.uint8)
    s = np.zeros((G, nsub, LANES), np.float32)
    m = np.zeros((G, nsub if has_m else 0, LANES), np.float32)
    _launch(pack_k_blocks, raw2, (ts, nspb, kind, KV_IQ4), q, s, m, threads)
    return PackedMatrix(family, t, rows, cols, group, q, s, m)
