"""Reorder packed matrices for the int8-activation kernels (:mod:`apr_numba.kernels.vnni`), and the switch.

``vpdpbusd`` multiplies 4 consecutive bytes of a 32-bit lane with 4 bytes of the other operand, so each of the
64 rows of a group needs its codes 4 at a time: byte ``j`` of lane ``l`` in the float layout
(``q[g, b, j, l]``) moves to ``(j // 4) * 256 + l * 4 + j % 4`` of the block. The array shape stays the same
(G, nsub, k, LANES), so every kernel signature stays the same; only the family changes (U4 -> U4V, I8 -> I8V,
whose codes also get +128 to be unsigned). U5 (16-bit words of three 5-bit codes) becomes U5V: U4V's nibbles
plus a plane of bit-4 masks (kernels/vnni.py). Nothing is lost: :func:`from_vnni` gives the float layout back.

Activations: ``APR_NUMBA_ACTIVATIONS=int8`` (or ``activations="int8"`` where a loader takes it) quantizes them
to int8 blocks of 32 as llama.cpp does; the default ``f32`` keeps the exact float path. F32 matrices (and I8
with other than 16 or 32 codes per block) keep the float path in either mode.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np

from apr_numba.quants.blocks import (
    FAMILY_I8,
    FAMILY_I8V,
    FAMILY_U4,
    FAMILY_U4V,
    FAMILY_U5,
    FAMILY_U5V,
    u5_codes,
    u5_words,
)

ACTIVATIONS_ENV = "APR_NUMBA_ACTIVATIONS"
ACTIVATION_MODES = ("f32", "int8")


_CHOSEN: list[str | None] = [None]  # the mode of the load in progress (packing_for), else None


def activation_mode(mode: str | None = None) -> str:
    """``mode`` if given, else that of the enclosing :func:`packing_for`, else ``$APR_NUMBA_ACTIVATIONS``, else
    ``"f32"``.

    Raises:
        ValueError: for anything but ``f32`` or ``int8``.
    """
    if mode is None:
        mode = _CHOSEN[0] if _CHOSEN[0] is not None else os.environ.get(ACTIVATIONS_ENV, "")
    v = mode.strip().lower() or "f32"
    if v not in ACTIVATION_MODES:
        raise ValueError(f"{ACTIVATIONS_ENV} (activations) must be one of {ACTIVATION_MODES}, got {v!r}")
    return v


@contextlib.contextmanager
def packing_for(mode: str | None):
    """Within the block, matrices are packed for ``activation_mode(mode)`` (``load(activations=...)``).

    Raises:
        ValueError: a mode other than f32 / int8 (on entering).
    """
    old = _CHOSEN[0]
    _CHOSEN[0] = activation_mode(mode)
    try:
        yield _CHOSEN[0]
    finally:
        _CHOSEN[0] = old


def add_activation_arg(parser) -> None:
    """The ``--activations {f32,int8}`` option of the CLI commands that load a model (run, bench, chat, serve);
    ``apr_numba.cli.main`` puts a given value into ``$APR_NUMBA_ACTIVATIONS`` before the command runs."""
    parser.add_argument("--activations", choices=ACTIVATION_MODES, default=None,
                        help="CPU products: f32 keeps activations in float32 (exact); int8 quantizes them to blocks "
                             "of 32 as llama.cpp does (AVX-512 VNNI dot products: faster, logits cosine ~1-1e-5) "
                             f"(default: ${ACTIVATIONS_ENV}, else f32)")


def _permute(q: np.ndarray) -> np.ndarray:
    G, nb, k, L = q.shape
    return np.ascontiguousarray(q.reshape(G, nb, k // 4, 4, L).transpose(0, 1, 2, 4, 3)).reshape(G, nb, k, L)


def _unpermute(q: np.ndarray) -> np.ndarray:
    G, nb, k, L = q.shape
    return np.ascontiguousarray(q.reshape(G, nb, k // 4, L, 4).transpose(0, 1, 2, 4, 3)).reshape(G, nb, k, L)


def _u5v_from_words(q: np.ndarray) -> np.ndarray:
    """U5 words (G, nb, 11, 2L) uint8 -> U5V (G, nb, 20, L) uint8 (kernels/vnni.py)."""
    G, nb, _, L2 = q.shape
    L = L2 // 2
    c = u5_codes(q.view(np.uint16).transpose(0, 1, 3, 2))  # (G, nb, L, 32)
    lo = c[..., :16].reshape(G, nb, L, 4, 4)  # (.., lane, jj, t)
    hi = c[..., 16:].reshape(G, nb, L, 4, 4)
    nib = ((lo & 15) | ((hi & 15) << 4)).transpose(0, 1, 3, 2, 4).reshape(G, nb, 4, 4 * L)  # (jj, lane*4+t)
    bl = (lo >> 4).transpose(0, 1, 3, 2, 4).reshape(G, nb, 4, 4, 64)  # (jj, vector c, byte i)
    bh = (hi >> 4).transpose(0, 1, 3, 2, 4).reshape(G, nb, 4, 4, 64)
    masks = np.packbits(np.stack([bl, bh], axis=4), axis=-1, bitorder="little")  # (G, nb, jj, c, 2, 8)
    out = np.concatenate([nib.reshape(G, nb, 16 * L), masks.reshape(G, nb, 256)], axis=2)
    return np.ascontiguousarray(out.reshape(G, nb, 16 + 256 // L, L))


def _u5_words_from_u5v(q: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_u5v_from_words`."""
    G, nb, _, L = q.shape
    flat = q.reshape(G, nb, -1)
    nib = flat[..., :16 * L].reshape(G, nb, 4, L, 4)  # (jj, lane, t)
    bits = np.unpackbits(flat[..., 16 * L:].reshape(G, nb, 4, 4, 2, 8), axis=-1, bitorder="little")
    bits = bits.reshape(G, nb, 4, 4, 2, 64)  # (jj, c, half, i) with lane*4+t = c*64 + i
    bl = bits[..., 0, :].reshape(G, nb, 4, L, 4)
    bh = bits[..., 1, :].reshape(G, nb, 4, L, 4)
    lo = (nib & 15) | (bl << 4)
    hi = (nib >> 4) | (bh << 4)
    c = np.concatenate([lo.transpose(0, 1, 3, 2, 4).reshape(G, nb, L, 16),
                        hi.transpose(0, 1, 3, 2, 4).reshape(G, nb, L, 16)], axis=-1)
    w = u5_words(c)  # (G, nb, L, 11)
    return np.ascontiguousarray(w.transpose(0, 1, 3, 2)).view(np.uint8)


def vnni_family(family: int, k: int) -> int | None:
    """The int8-activation family for a float family with ``k`` code rows per block, or None (no such path)."""
    if family == FAMILY_U4 and k == 16:
        return FAMILY_U4V
    if family == FAMILY_U5:
        return FAMILY_U5V
    if family == FAMILY_I8 and k in (16, 32):
        return FAMILY_I8V
    return None


def to_vnni(pm):
    """The :class:`~apr_numba.quants.repack.PackedMatrix` ``pm`` in the int8-activation layout, or ``pm`` itself
    when its family has none (U5, F32, already converted). Requires ``cols`` to be a multiple of 32."""
    fam = vnni_family(pm.family, pm.q.shape[2] if pm.q.ndim == 4 else 0)
    if fam is None or pm.cols % 32:
        return pm
    if fam == FAMILY_U5V:
        return type(pm)(fam, pm.ggml_type, pm.rows, pm.cols, pm.group, _u5v_from_words(pm.q), pm.s, pm.m)
    q = _permute(pm.q)
    if fam == FAMILY_I8V:
        q = (q.view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return type(pm)(fam, pm.ggml_type, pm.rows, pm.cols, pm.group, q, pm.s, pm.m)


def float_codes(family: int, q: np.ndarray) -> tuple[int, np.ndarray]:
    """``(float family, q in the float layout)`` for a U4V / I8V ``q`` (the inverse of :func:`to_vnni`)."""
    if family == FAMILY_U4V:
        return FAMILY_U4, _unpermute(q)
    if family == FAMILY_U5V:
        return FAMILY_U5, _u5_words_from_u5v(q)
    if family == FAMILY_I8V:
        return FAMILY_I8, (_unpermute(q).astype(np.int16) - 128).astype(np.int8).view(np.uint8)
    return family, q


def from_vnni(pm):
    """``pm`` back in its float layout (bit for bit what was converted)."""
    fam, q = float_codes(pm.family, pm.q)
    if fam == pm.family:
        return pm
    return type(pm)(fam, pm.ggml_type, pm.rows, pm.cols, pm.group, q, pm.s, pm.m)
