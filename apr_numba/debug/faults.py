"""Teaching faults: known, realistic bug classes that can be injected into one layer (or all) of a backend.

``--inject NAME[@LAYER]`` (CLI) / ``inject="NAME@LAYER"`` (API) breaks exactly one thing, so that
:mod:`apr_numba.debug.bisection` can be watched finding it. Every fault is a bug that has really shipped in some
inference engine; each entry of :data:`FAULTS` says what is wrong, where bugs of that class have
happened, and the trace stage where the damage first becomes visible (``enters``), which is what
bisection must name.

``NAME`` alone (no ``@LAYER``) breaks every layer, like a kernel bug would; ``NAME@N`` only layer N;
``NAME@all`` is the same as no layer.

How each backend takes a fault:

* CPU (Numba): the compiled forward reads a per-layer flag table (``layer_fault``, columns
  :data:`apr_numba.arch.stages.FAULTS`) plus the wrong RoPE tables and the wrong epsilon from its ``dbg``
  tuple. The model itself is never modified.
* Reference (NumPy float64): :meth:`apr_numba.backends.reference.ReferenceModel.block` takes a
  :class:`BlockFaults`.
* OpenCL: the same ``dbg`` tuple (:mod:`apr_numba.backends.opencl_trace`).

``q4k-scale`` is a weight fault: the matrix's bytes are rewritten (:func:`corrupted_raw`) so that each
backend's own, correct decoder yields the wrongly-scaled weights: the CPU repacks them into a modified
copy of the packed-matrix list (``Model.eval(mats=...)``), the reference dequantizes them with gguf-py,
and OpenCL uploads them (a backend over a :class:`PatchedSource`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from apr_numba.arch.faults import (  # noqa: F401 (re-exported: the fault table lives in arch)
    FAULT_ID,
    FAULT_NAMES,
    FAULTS,
    MATRIX_STAGE,
    N_FAULTS,
    WRONG_EPS,
    WRONG_ROPE_BASE,
    WRONG_ROPE_BASE_IF_10K,
    FaultInfo,
)
from apr_numba.errors import ArgumentError
from apr_numba.quants.layouts import Codes, T, decode_codes


@dataclass(frozen=True)
class BlockFaults:
    """The faults active in one transformer block (what the reference's ``block`` takes).

    ``names``: fault names; ``rope_theta``: the wrong RoPE base (rope-theta); ``eps``: the wrong RMSNorm
    epsilon (rmsnorm-eps).
    """

    names: frozenset = frozenset()
    rope_theta: float | None = None
    eps: float | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.names


NO_FAULTS = BlockFaults()


@dataclass
class FaultPlan:
    """A parsed fault resolved against a model.

    Attributes:
        name: fault name. spec: what the user wrote.
        layers: the layers it breaks (sorted).
        rope_theta_alt, eps_alt: wrong RoPE base / RMSNorm epsilon.
        matrices: for q4k-scale, (layer, slot) of every corrupted matrix (slot in weights.LAYER_MATS).
        enters: the stage where it first shows (per the first broken layer).
        notes: human-readable remarks (no-op on this model, layer substituted...).
        noop: True when the fault changes nothing on this model.
    """

    name: str
    spec: str
    layers: list[int]
    rope_theta_alt: float
    eps_alt: float
    matrices: list[tuple[int, str]] = field(default_factory=list)
    enters: str = ""
    notes: list[str] = field(default_factory=list)
    noop: bool = False

    @property
    def first_layer(self) -> int | None:
        """The first layer where the fault can show (None for a no-op)."""
        if self.noop:
            return None
        if self.matrices:
            return min(layer for layer, _ in self.matrices)
        return self.layers[0] if self.layers else None

    def expected(self) -> tuple[int, str] | None:
        """(layer, stage) that bisection should name, or None when the fault is a no-op here."""
        fl = self.first_layer
        return None if fl is None else (fl, self.enters)

    def flag_table(self, n_layer: int) -> np.ndarray:
        """int64 (n_layer, N_FAULTS) flags for the compiled forward (q4k-scale has no flag: weights)."""
        tab = np.zeros((n_layer, N_FAULTS), np.int64)
        if self.name in FAULT_ID and not self.noop:
            for layer in self.layers:
                tab[layer, FAULT_ID[self.name]] = 1
        return tab

    def block_faults(self, layer: int) -> BlockFaults:
        """The reference's view of this plan for block ``layer`` (weights are corrupted separately)."""
        if self.noop or layer not in self.layers or self.name == "q4k-scale":
            return NO_FAULTS
        return BlockFaults(frozenset({self.name}), self.rope_theta_alt, self.eps_alt)

    def describe(self) -> str:
        where = "every layer" if len(self.layers) > 1 else f"layer {self.layers[0]}"
        s = f"{self.name} ({where})"
        if self.matrices:
            s += ": " + ", ".join(f"blk.{la}.{slot}" for la, slot in self.matrices)
        return s


def parse_fault(spec: str) -> tuple[str, int | None]:
    """``NAME[@LAYER]`` -> (name, layer or None for every layer).

    Raises:
        ArgumentError: unknown name or a layer that is not a non-negative integer / ``all``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ArgumentError("empty fault spec (expected NAME[@LAYER])")
    name, _, layer = spec.strip().partition("@")
    name = name.strip().lower().replace("_", "-")
    if name not in FAULTS:
        raise ArgumentError(f"unknown fault {name!r} (choose from {', '.join(FAULT_NAMES)})")
    layer = layer.strip().lower()
    if not layer or layer == "all":
        return name, None
    if not layer.isdigit():
        raise ArgumentError(f"fault layer must be a layer number or 'all', got {layer!r} in {spec!r}")
    return name, int(layer)


def matrix_types(source, n_layer: int) -> dict[tuple[int, str], int]:
    """(layer, slot) -> GGML type id of every per-layer matrix a source (GGUFFile or ReferenceModel) has."""
    from apr_numba.model.weights import LAYER_MATS

    out = {}
    for layer in range(n_layer):
        for slot in LAYER_MATS:
            t = source.tensors.get(f"blk.{layer}.{slot}.weight")  # a MoE block has no dense ffn_gate/up/down
            if t is not None:
                out[(layer, slot)] = int(t.ggml_type if hasattr(t, "ggml_type") else t.tensor_type)
    return out


def _q4k_targets(types: dict[tuple[int, str], int], layers: list[int], n_layer: int,
                 notes: list[str]) -> list[tuple[int, str]]:
    """Matrices the q4k-scale fault corrupts in ``layers`` (see FAULTS['q4k-scale'])."""
    from apr_numba.model.weights import LAYER_MATS

    q4k = {(la, s) for (la, s), t in types.items() if t == T.Q4_K}
    if q4k:
        if len(layers) > 1:
            return sorted(q4k)
        want = layers[0]
        have = sorted({la for la, _ in q4k})
        if want not in have:
            near = min(have, key=lambda la: (abs(la - want), la))
            notes.append(f"layer {want} has no Q4_K matrix; using the nearest layer with one: {near} "
                         f"(Q4_K layers: {', '.join(map(str, have))})")
            want = near
        return sorted((la, s) for la, s in q4k if la == want)
    # no Q4_K at all: emulate on the first 4-bit matrix (Q4_0/Q4_1) of each layer
    four = {T.Q4_0, T.Q4_1}
    out = []
    for la in layers:
        slot = next((s for s in LAYER_MATS if types.get((la, s)) in four), None)
        if slot is not None:
            out.append((la, slot))
    if not out:
        return out
    notes.append("no Q4_K matrices in this model: the Q4_K scale bug is emulated on the 4-bit block scales "
                 f"of {', '.join(f'blk.{la}.{s}' for la, s in out[:3])}{' ...' if len(out) > 3 else ''} "
                 "(faults.corrupted_raw)")
    return out


def _layer_rope_bases(config, source) -> list[float]:
    """Each layer's RoPE base: from the architecture description of ``source`` when it has GGUF metadata
    (gemma3's local layers have their own), else ``config.rope_theta`` for every layer."""
    meta = getattr(source, "metadata", None)
    if meta is not None:
        from apr_numba.arch.spec import ArchSpec

        return list(ArchSpec.from_metadata(meta, str(getattr(source, "path", "model")), source.tensors,
                                           n_vocab=config.n_vocab).layer_rope_base)
    return [float(config.rope_theta)] * config.n_layer


def plan_fault(spec: str | None, config, source=None) -> FaultPlan | None:
    """Parse ``spec`` and resolve it against a model (``config``: ModelConfig; ``source``: anything with
    ``tensors`` mapping GGUF names to objects with ``ggml_type``/``tensor_type``, needed for q4k-scale).

    Raises:
        ArgumentError: unknown fault, layer out of range, or q4k-scale on a model without 4-bit matrices.
    """
    if spec is None:
        return None
    name, layer = parse_fault(spec)
    L = config.n_layer
    if layer is not None and not 0 <= layer < L:
        raise ArgumentError(f"fault layer {layer} out of range (model has layers 0..{L - 1})")
    layers = list(range(L)) if layer is None else [layer]
    bases = _layer_rope_bases(config, source)
    base = bases[layers[0]] if layer is not None else float(config.rope_theta)  # the base the fault replaces
    plan = FaultPlan(name, spec, layers, WRONG_ROPE_BASE_IF_10K if base == WRONG_ROPE_BASE else WRONG_ROPE_BASE,
                     WRONG_EPS, enters=FAULTS[name].enters)
    if name == "rope-theta":
        plan.notes.append(f"RoPE base {plan.rope_theta_alt:g} instead of {base:g}")
        # gemma3: local layers have their own base; the wrong base breaks only the layers whose base differs
        plan.layers = [la for la in layers if bases[la] != plan.rope_theta_alt]
        if len(plan.layers) < len(layers):
            plan.notes.append(f"layers whose own base is {plan.rope_theta_alt:g} are unchanged")
        if not plan.layers:
            plan.layers, plan.noop = layers, True
    if name == "gqa-map" and config.n_head_kv == 1:
        plan.noop = True
        plan.notes.append("this model has one KV head: every query head reads it, gqa-map is a no-op here")
    if name == "ffn-swap" and source is not None and f"blk.{layers[0]}.ffn_gate.weight" not in source.tensors:
        plan.noop = True
        plan.notes.append("this block has no dense gated FFN (a mixture of experts): ffn-swap is a no-op here")
    if name == "rmsnorm-eps":
        plan.notes.append(f"RMSNorm eps {plan.eps_alt:g} instead of {config.rms_eps:g}")
    if name == "qkv-bias-drop" and source is not None and f"blk.{layers[0]}.attn_q.bias" not in source.tensors:
        plan.noop = True
        plan.notes.append("this model has no QKV biases: qkv-bias-drop is a no-op here (bisection names nothing)")
    if name == "q4k-scale":
        if source is None:
            raise ArgumentError("q4k-scale needs the model's tensor types (pass a source)")
        plan.matrices = _q4k_targets(matrix_types(source, L), layers, L, plan.notes)
        if not plan.matrices:
            raise ArgumentError("q4k-scale: this model has no 4-bit (Q4_K, Q4_0, Q4_1) matrices to corrupt")
        plan.layers = sorted({la for la, _ in plan.matrices})
        plan.enters = MATRIX_STAGE[plan.matrices[0][1]]
    return plan


# ------------------------------------------------------------------------------------ wrong scale decoding


def q4k_scale_bug(codes: Codes, raw: np.ndarray) -> Codes:
    """Codes of a Q4_K matrix decoded with the get_scale_min_k4 bug (sub-blocks 4..7 lose bits 4, 5): the
    definition of the fault, written as the buggy decoder; :func:`corrupted_raw` produces the same weights
    through a correct decoder.

    ``raw``: the matrix's GGML bytes. Right (ggml): for j >= 4, ``sc = (q[j+4] & 0xF) | ((q[j-4] >> 6) << 4)``,
    ``m = (q[j+4] >> 4) | ((q[j] >> 6) << 4)``; wrong: ``sc = q[j+4] & 0xF``, ``m = q[j+4] >> 4``.
    """
    rows, cols = codes.codes.shape
    blocks = np.asarray(raw).reshape(-1).view(np.uint8).reshape(-1, 144)
    d = blocks[:, 0:2].copy().view("<f2").astype(np.float32)  # (nb, 1)
    dmin = blocks[:, 2:4].copy().view("<f2").astype(np.float32)
    q = blocks[:, 4:16]
    sc = np.concatenate([q[:, 0:4] & 63, q[:, 8:12] & 0x0F], axis=1).astype(np.float32)  # bug: high bits lost
    mn = np.concatenate([q[:, 4:8] & 63, q[:, 8:12] >> 4], axis=1).astype(np.float32)
    scale = (d * sc).reshape(rows, -1)
    off = (dmin * mn).reshape(rows, -1)
    return Codes(codes.family, codes.ggml_type, codes.codes, scale, off, codes.group)


def _drop_high_bits(v: np.ndarray) -> np.ndarray:
    """Per row, each run of 8 values (one 256-value super-block of 32-value blocks) re-expressed as 6-bit
    multiples of the run's largest |value|; values 4..7 of the run keep only the low 4 bits of that number."""
    out = v.astype(np.float32).copy()
    nsub = v.shape[1]
    for g0 in range(0, nsub, 8):
        blk = v[:, g0:g0 + 8].astype(np.float64)
        if blk.shape[1] <= 4:
            continue
        vmax = np.abs(blk).max(axis=1, keepdims=True)
        vmax[vmax == 0] = 1.0
        q6 = np.clip(np.rint(np.abs(blk[:, 4:]) / vmax * 63), 0, 63).astype(np.int64)
        out[:, g0 + 4:g0 + 8] = np.sign(blk[:, 4:]) * vmax * (q6 & 0x0F) / 63.0
    return out


def corrupted_raw(ggml_type: int, raw: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The matrix's GGML bytes rewritten so that a *correct* decoder computes the q4k-scale fault.

    Every backend (CPU repack, float64 reference via gguf-py, OpenCL kernels reading raw blocks) then sees
    the same wrong weights. Q4_K: bits 6-7 of scale bytes 0..7 are cleared, which are exactly the high bits
    that :func:`q4k_scale_bug` drops (sub-blocks 0..3 keep their 6 low bits). Q4_0 / Q4_1 (no packed
    sub-block scales): the block scale d (and Q4_1's min m) of blocks 4..7 of every 256 values gets the
    same error, emulated: written as a 6-bit multiple of the run's largest |d| with the top 2 bits dropped
    (:func:`_drop_high_bits`), then stored as float16.

    Raises:
        ArgumentError: another type.
    """
    rows, cols = shape
    blocks = np.asarray(raw).reshape(-1).view(np.uint8).copy()
    if ggml_type == T.Q4_K:
        b = blocks.reshape(-1, 144)
        b[:, 4:12] &= 0x3F
        return blocks
    if ggml_type not in (T.Q4_0, T.Q4_1):
        raise ArgumentError(f"q4k-scale: no wrong-scale decoding defined for GGML type {T(ggml_type).name}")
    ts = 18 if ggml_type == T.Q4_0 else 20
    b = blocks.reshape(-1, ts)
    fields = (0,) if ggml_type == T.Q4_0 else (0, 2)  # d, and Q4_1's m
    for o in fields:
        v = np.ascontiguousarray(b[:, o:o + 2]).view("<f2").astype(np.float32).reshape(rows, cols // 32)
        b[:, o:o + 2] = _drop_high_bits(v).astype("<f2").reshape(-1, 1).view(np.uint8)
    return blocks


def corrupted_codes(ggml_type: int, raw: np.ndarray, shape: tuple[int, int], name: str = "tensor") -> Codes:
    """:func:`decode_codes` of :func:`corrupted_raw`: the matrix as the q4k-scale fault decodes it."""
    return decode_codes(ggml_type, corrupted_raw(ggml_type, raw, shape), shape, name)


class PatchedSource:
    """A weights source (``path``, ``tensors``, ``data(name)``) with some tensors' bytes replaced."""

    def __init__(self, source, patches: dict[str, np.ndarray]):
        self._source, self.patches = source, patches
        self.path, self.tensors = source.path, source.tensors

    def data(self, name: str) -> np.ndarray:
        return self.patches[name] if name in self.patches else self._source.data(name)

    def __getattr__(self, attr):
        return getattr(self._source, attr)


def faulty_source(source, plan: FaultPlan | None):
    """``source`` with the q4k-scale plan's matrices corrupted (:func:`corrupted_raw`), or ``source``."""
    if plan is None or not plan.matrices:
        return source
    patches = {}
    for layer, slot in plan.matrices:
        name = f"blk.{layer}.{slot}.weight"
        t = source.tensors[name]
        patches[name] = corrupted_raw(int(t.ggml_type), source.data(name), tuple(t.shape))
    return PatchedSource(source, patches)
