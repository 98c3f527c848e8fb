"""Compare two traced tensors (APRT files) or two trace folders (aprender ``apr diff --values``).

Numbers, all in float64 on the float32 values:

* ``cosine``: a.b / (|a| |b|), 0 when a norm is 0; NaN when NaN or inf appear on one side only or at
  different places (a divergence for bisection); when both sides have the very same non-finite values
  (two runs with the same fault), the cosine of the finite rest.
* ``max_abs_diff`` and its flat ``max_abs_index``; ``rms_diff`` = sqrt(mean((a - b)^2)). A position where
  only one side is NaN, or the sides are different infinities, counts as an infinite difference; where
  both are NaN (or the same infinity) as 0.
* ``top``: the K largest |a - b| with their index and both values.

JSON (``--json``) follows :data:`DIFF_JSON_SCHEMA` (schema name "apr-stage-diff-v1"); non-finite numbers
are written as null (JSON has no NaN), with the counts of non-finite values in ``nonfinite_a/b``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from apr_numba.debug.tracing import Trace, chain_order, read_aprt, single_thread_blas
from apr_numba.errors import ArgumentError, ModelFormatError

SCHEMA = "apr-stage-diff-v1"

_NUM = {"type": ["number", "null"]}
DIFF_JSON_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": SCHEMA,
    "type": "object",
    "required": ["schema", "a", "b", "layer", "n", "cosine", "max_abs_diff", "max_abs_index", "rms_diff",
                 "nonfinite_a", "nonfinite_b", "top"],
    "properties": {
        "schema": {"const": SCHEMA},
        "a": {"type": "string"}, "b": {"type": "string"},
        "layer": {"type": ["integer", "null"]},  # null: whole-model stage
        "n": {"type": "integer"},
        "cosine": _NUM, "max_abs_diff": _NUM, "max_abs_index": {"type": "integer"}, "rms_diff": _NUM,
        "nonfinite_a": {"type": "integer"}, "nonfinite_b": {"type": "integer"},
        "top": {"type": "array", "items": {
            "type": "object", "required": ["index", "a", "b", "abs_diff"],
            "properties": {"index": {"type": "integer"}, "a": _NUM, "b": _NUM, "abs_diff": _NUM}}},
    },
}


def finite_pair(a: np.ndarray, b: np.ndarray):
    """(a, b) flattened float64, restricted to their finite values when both have the very same NaN/inf
    (same places, same values); None when the non-finite values differ."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    fa, fb = np.isfinite(a), np.isfinite(b)
    if fa.all() and fb.all():
        return a, b
    if not (np.array_equal(fa, fb) and np.array_equal(a[~fa], b[~fb], equal_nan=True)):
        return None
    return a[fa], b[fb]


def cosine(a, b) -> float:
    """Cosine similarity accumulated in float64: 0 when a norm is 0; NaN when NaN/inf appear on one side
    only (or at different places); over the finite values when both sides have the same NaN/inf."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if a.size != b.size:
        raise ArgumentError(f"cosine of arrays of different lengths ({a.size} vs {b.size})")
    pair = finite_pair(a, b)
    if pair is None:
        return math.nan
    a, b = pair
    aa, bb = float(a @ a), float(b @ b)
    if aa == 0.0 or bb == 0.0:
        return 0.0
    return float(a @ b) / math.sqrt(aa * bb)  # sqrt of the product: exactly 1.0 for identical arrays


@dataclass
class StageDiff:
    """The numbers of one comparison (see the module docstring)."""

    n: int
    cosine: float
    max_abs_diff: float
    max_abs_index: int
    rms_diff: float
    nonfinite_a: int
    nonfinite_b: int
    top: list[dict] = field(default_factory=list)
    layer: int | None = None
    a: str = ""
    b: str = ""

    def to_json(self) -> dict:
        """The apr-stage-diff-v1 object (non-finite numbers as null)."""
        def fin(v):
            return float(v) if v is not None and math.isfinite(v) else None

        d = asdict(self)
        out = {"schema": SCHEMA, "a": self.a, "b": self.b, "layer": self.layer, "n": self.n,
               "cosine": fin(self.cosine), "max_abs_diff": fin(self.max_abs_diff),
               "max_abs_index": self.max_abs_index, "rms_diff": fin(self.rms_diff),
               "nonfinite_a": self.nonfinite_a, "nonfinite_b": self.nonfinite_b,
               "top": [{"index": t["index"], "a": fin(t["a"]), "b": fin(t["b"]), "abs_diff": fin(t["abs_diff"])}
                       for t in d["top"]]}
        return out


def _abs_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs(a - b)
    bad = ~np.isfinite(d)
    if bad.any():
        same = (np.isnan(a) & np.isnan(b)) | (a == b)  # both NaN, or the same infinity
        d[bad] = np.where(same[bad], 0.0, np.inf)
    return d


def diff_arrays(a, b, limit: int = 10, layer: int | None = None) -> StageDiff:
    """Compare two arrays of the same length (flattened)."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if a.size != b.size:
        raise ArgumentError(f"length mismatch: {a.size} vs {b.size} values")
    if limit < 0:
        raise ArgumentError(f"--limit must be >= 0, got {limit}")
    d = _abs_diff(a, b)
    n = a.size
    imax = int(np.argmax(d)) if n else 0
    with np.errstate(over="ignore"):
        rms = float(np.sqrt(np.mean(d * d))) if n else 0.0
    k = min(int(limit), n)
    top_idx = np.argsort(-d, kind="stable")[:k] if k else []
    top = [{"index": int(i), "a": float(a[i]), "b": float(b[i]), "abs_diff": float(d[i])} for i in top_idx]
    return StageDiff(n, cosine(a, b), float(d[imax]) if n else 0.0, imax, rms, int((~np.isfinite(a)).sum()),
                     int((~np.isfinite(b)).sum()), top, layer)


def diff_files(path_a, path_b, limit: int = 10) -> StageDiff:
    """Compare two APRT files.

    Raises:
        ModelFormatError: a file is not APRT. ArgumentError: layer or length mismatch.
    """
    la, a = read_aprt(path_a)
    lb, b = read_aprt(path_b)
    if la != lb:
        def name(x):
            return "whole-model" if x is None else f"layer {x}"
        raise ArgumentError(f"layer mismatch: {path_a} is {name(la)}, {path_b} is {name(lb)}")
    if a.size != b.size:
        raise ArgumentError(f"length mismatch: {path_a} has {a.size} values, {path_b} has {b.size}")
    r = diff_arrays(a, b, limit, la)
    r.a, r.b = str(path_a), str(path_b)
    return r


def diff_traces(a: Trace, b: Trace) -> list[tuple[tuple[int | None, str], StageDiff | None, str]]:
    """Every stage of two traces in compute order: (key, diff or None, note) where note says "only in A/B"
    or "length mismatch"."""
    out = []
    with single_thread_blas():
        for key in chain_order(set(a.tensors) | set(b.tensors)):
            out.append(_diff_key(a, b, key))
    return out


def _diff_key(a: Trace, b: Trace, key):
    if key not in b.tensors:
        return key, None, "only in A"
    if key not in a.tensors:
        return key, None, "only in B"
    if a.tensors[key].size != b.tensors[key].size:
        return key, None, f"length mismatch {a.tensors[key].size} vs {b.tensors[key].size}"
    return key, diff_arrays(a.tensors[key], b.tensors[key], 0, key[0]), ""


def format_diff(r: StageDiff, values: bool = True) -> str:
    """Human-readable report of one comparison."""
    where = "whole-model" if r.layer is None else f"layer {r.layer}"
    lines = [f"A: {r.a}", f"B: {r.b}", f"{where}, {r.n} values",
             f"cosine        {r.cosine:.9f}", f"max_abs_diff  {r.max_abs_diff:.6g} at index {r.max_abs_index}",
             f"rms_diff      {r.rms_diff:.6g}"]
    if r.nonfinite_a or r.nonfinite_b:
        lines.append(f"non-finite    A {r.nonfinite_a}, B {r.nonfinite_b}")
    if values and r.top:
        lines.append(f"top {len(r.top)} differences:")
        lines.append(f"  {'index':>10}  {'A':>14}  {'B':>14}  {'|A-B|':>12}")
        lines += [f"  {t['index']:>10}  {t['a']:>14.7g}  {t['b']:>14.7g}  {t['abs_diff']:>12.5g}" for t in r.top]
    return "\n".join(lines)


def format_dir_diff(rows) -> str:
    """One line per stage both folders hold (:func:`diff_traces` rows), then how many are in one only."""
    lines = [f"{'layer':>5}  {'stage':<19} {'cosine':>12}  {'max_abs_diff':>12}  {'rms_diff':>10}  {'n':>9}"]
    only = {"only in A": 0, "only in B": 0}
    for (layer, stage), r, note in rows:
        lay = "-" if layer is None else str(layer)
        if note in only:
            only[note] += 1
        elif r is None:
            lines.append(f"{lay:>5}  {stage:<19} {note}")
        else:
            lines.append(f"{lay:>5}  {stage:<19} {r.cosine:>12.9f}  {r.max_abs_diff:>12.5g}  {r.rms_diff:>10.4g}  "
                         f"{r.n:>9}")
    lines += [f"({n} stage files {k[:7]} {k[-1]})" for k, n in only.items() if n]
    return "\n".join(lines)


def diff_paths(path_a, path_b, limit: int = 10):
    """Files -> StageDiff; folders -> diff_traces rows.

    Raises:
        ArgumentError: one is a folder and the other a file; ModelFormatError: bad files.
    """
    pa, pb = Path(path_a), Path(path_b)
    for p in (pa, pb):
        if not p.exists():
            raise ArgumentError(f"{p}: no such file or directory")
    if pa.is_dir() != pb.is_dir():
        raise ArgumentError("diff needs two APRT files or two trace directories")
    if pa.is_dir():
        return diff_traces(Trace.load(pa), Trace.load(pb))
    return diff_files(pa, pb, limit)


def validate_diff_json(obj, schema: dict = DIFF_JSON_SCHEMA, path: str = "$") -> None:
    """Check ``obj`` against the (small) JSON-Schema subset used by :data:`DIFF_JSON_SCHEMA`.

    Raises:
        ModelFormatError: the first violation, with its JSON path.
    """
    types = {"object": dict, "array": list, "string": str, "null": type(None), "integer": int,
             "number": (int, float)}

    def is_type(v, t):
        if t in ("integer", "number") and isinstance(v, bool):
            return False
        return isinstance(v, types[t])

    if "const" in schema and obj != schema["const"]:
        raise ModelFormatError(f"{path}: expected {schema['const']!r}, got {obj!r}")
    if "type" in schema:
        ts = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(is_type(obj, t) for t in ts):
            raise ModelFormatError(f"{path}: expected {'/'.join(ts)}, got {type(obj).__name__}")
    if isinstance(obj, dict):
        for k in schema.get("required", []):
            if k not in obj:
                raise ModelFormatError(f"{path}: missing key {k!r}")
        for k, sub in schema.get("properties", {}).items():
            if k in obj:
                validate_diff_json(obj[k], sub, f"{path}.{k}")
    if isinstance(obj, list) and "items" in schema:
        for i, v in enumerate(obj):
            validate_diff_json(v, schema["items"], f"{path}[{i}]")
