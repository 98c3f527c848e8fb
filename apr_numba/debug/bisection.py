"""Stage bisection: find the first (layer, stage) where a backend stops agreeing with a reference.

aprender found a real GPU attention bug this way: trace every intermediate tensor on both sides, walk the
chain of stages in compute order, and stop at the first stage whose cosine falls below the threshold
while the stage before it still holds. That stage is where the bug *enters*; everything after it is
downstream damage. ``apr-numba bisect MODEL -p PROMPT --a cpu --b reference [--inject FAULT]`` does the
whole walk; ``--inject`` plants a known teaching fault (:mod:`apr_numba.debug.faults`) on side A so the
method can be watched finding it.

Both sides run the same token ids from a fresh cache (one prefill pass, positions 0..T-1). Side B is
clean: a backend (``reference``, ``cpu``, ``opencl``) or a trace folder written by ``apr-numba trace``.
The chain is layer 0's embedding, then for each layer its stages in canonical order, then final_norm
and lm_head. Rule (aprender): the first adjacent pair where stage i holds and stage i+1 does not names
stage i+1; if the very first stage fails, it is named.

A stage *holds* when its cosine is >= the threshold (a NaN cosine, from NaN/inf on one side only, never
holds) **and** its norm ratio |A| / |B| lies in [threshold, 1 / threshold]. The norm check is this
project's addition: the cosine is blind to a pure rescaling (a missing 1/sqrt(head_dim) multiplies the
scores by 8 and leaves their cosine at 1.000000, so a cosine-only walk blames the softmax, the first
non-linear stage after the bug). ``cosine_only=True`` (``--cosine-only``) is aprender's rule exactly.

RoPE note: at position 0 RoPE is the identity, so RoPE faults need prompts of >= 2 tokens (the default
tutorial prompt has 6); cosines are over all positions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from apr_numba.arch.stages import SaveTensorStage
from apr_numba.debug.stage_diff import diff_arrays, finite_pair
from apr_numba.debug.tracing import BACKENDS, Trace, chain_order, single_thread_blas, trace
from apr_numba.errors import ArgumentError

DEFAULT_THRESHOLD = 0.999
WINDOW = 3  # stages shown on each side of the named one


@dataclass
class ChainRow:
    """One stage of the chain: cosine A vs B, max |A - B|, |A| / |B|, and whether it holds."""

    layer: int | None
    stage: str
    cosine: float
    max_abs_diff: float
    norm_ratio: float
    holds: bool


@dataclass
class BisectResult:
    """What :func:`bisect` found.

    Attributes:
        rows: every compared stage in compute order. index: position of the named stage in rows, or None.
        layer, stage: the named stage (None when nothing diverges). expected: (layer, stage) where the
        injected fault should enter, or None (no fault, or a no-op fault). notes: remarks on the fault.
    """

    model: str
    tokens: list[int]
    a: str
    b: str
    inject: str | None
    threshold: float
    rows: list[ChainRow]
    index: int | None
    notes: list[str] = field(default_factory=list)
    expected: tuple[int, str] | None = None

    @property
    def diverged(self) -> bool:
        return self.index is not None

    @property
    def layer(self) -> int | None:
        return None if self.index is None else self.rows[self.index].layer

    @property
    def stage(self) -> str | None:
        return None if self.index is None else self.rows[self.index].stage

    def cosine(self, stage: str, layer: int | None = None) -> float:
        """The cosine of one stage of the chain."""
        for r in self.rows:
            if r.stage == stage and (r.layer == layer or r.layer is None):
                return r.cosine
        raise KeyError(f"{stage} (layer {layer}) is not in the chain")

    def window(self, k: int = WINDOW) -> list[ChainRow]:
        """The rows around the named stage (or the k lowest-cosine rows' neighbourhood when none)."""
        if self.index is None:
            return []
        return self.rows[max(0, self.index - k):self.index + k + 1]

    def to_dict(self) -> dict:
        d = asdict(self)
        for r in d["rows"]:
            for key in ("cosine", "max_abs_diff"):
                if not math.isfinite(r[key]):
                    r[key] = None
        d.update(diverged=self.diverged, layer=self.layer, stage=self.stage)
        return d


def first_divergence(rows: list[ChainRow]) -> int | None:
    """Index of the first stage that does not hold (all before it hold), or None."""
    for i, r in enumerate(rows):
        if not r.holds:
            return i
    return None


def _side(spec):
    """'cpu' | 'reference' | 'opencl' | a trace folder | a Trace -> ('backend', name) or ('trace', Trace)."""
    if isinstance(spec, Trace):
        return "trace", spec
    s = str(spec)
    if s in BACKENDS:
        return "backend", s
    if Path(s).is_dir():
        return "trace", Trace.load(s)
    raise ArgumentError(f"bisect side {s!r} is not a backend ({', '.join(BACKENDS)}) or a trace directory")


def bisect(model, prompt: str | None = None, *, tokens=None, a: str = "cpu", b: str = "reference",
           inject: str | None = None, threshold: float = DEFAULT_THRESHOLD, cosine_only: bool = False) -> BisectResult:
    """Trace all stages of all layers on sides ``a`` and ``b`` and name the first diverging stage.

    Args:
        model: a loaded Model, a registry name or a path.
        prompt / tokens: the input (a trace folder on side B supplies its own tokens when neither is given).
        a: the backend under test ("cpu", "opencl", "reference"); the fault is injected here.
        b: the clean side: a backend, a trace folder, or a :class:`Trace`.
        inject: teaching fault ``NAME[@LAYER]`` for side A.
        threshold: cosine a stage must reach to hold (default 0.999); its norm must also agree within
            [threshold, 1/threshold] unless ``cosine_only`` (aprender's rule exactly).

    Returns:
        :class:`BisectResult` (``.stage`` / ``.layer`` None when nothing diverges).

    Raises:
        ArgumentError: bad sides, threshold, fault, or a trace folder made from other tokens.
    """
    from apr_numba.debug.tracing import _as_model

    if not 0.0 < threshold <= 1.0:
        raise ArgumentError(f"threshold must be in (0, 1], got {threshold}")
    kind_a, side_a = _side(a)
    kind_b, side_b = _side(b)
    if kind_a != "backend":
        raise ArgumentError("side A must be a backend (cpu, opencl, reference): the fault is injected there")
    m = _as_model(model)
    if tokens is None and prompt is None:
        if kind_b == "trace" and side_b.tokens:
            tokens = side_b.tokens
        else:
            raise ArgumentError("no prompt: pass -p PROMPT (or tokens)")
    if tokens is None:
        from apr_numba.generation.generate import prompt_ids

        tokens = prompt_ids(m, prompt)
    tokens = [int(t) for t in tokens]
    if kind_b == "trace" and side_b.tokens and side_b.tokens != tokens:
        raise ArgumentError(f"trace directory {side_b.source} was made from other tokens ({side_b.tokens}) "
                            f"than this prompt ({tokens})")
    tr_a = trace(m, tokens=tokens, stages="all", layers=None, backend=side_a, inject=inject)
    tr_b = side_b if kind_b == "trace" else trace(m, tokens=tokens, stages="all", layers=None, backend=side_b)
    return compare_traces(tr_a, tr_b, threshold, model=str(m.path), a=side_a, inject=inject,
                          b=side_b.source or "trace" if kind_b == "trace" else side_b, config=m.config,
                          source=m.source, cosine_only=cosine_only)


def norm_ratio(a, b) -> float:
    """|a| / |b| in float64 (1 when both are 0, inf when only b is); over the finite values when both sides
    have the same NaN/inf, NaN when their non-finite values differ."""
    pair = finite_pair(a, b)
    if pair is None:
        return math.nan
    na, nb = float(np.linalg.norm(pair[0])), float(np.linalg.norm(pair[1]))
    if nb == 0.0:
        return 1.0 if na == 0.0 else math.inf
    return na / nb


def compare_traces(tr_a: Trace, tr_b: Trace, threshold: float = DEFAULT_THRESHOLD, *, model: str = "",
                   a: str = "A", b: str = "B", inject: str | None = None, config=None, source=None,
                   cosine_only: bool = False) -> BisectResult:
    """Walk the stages both traces hold, in compute order, and apply the bisection rule (see the module
    docstring; ``cosine_only`` drops the norm check)."""
    keys = chain_order(set(tr_a.tensors) & set(tr_b.tensors))
    if not keys:
        raise ArgumentError("the two traces have no stage in common")
    with single_thread_blas():
        rows = _chain_rows(tr_a, tr_b, keys, threshold, cosine_only)
    expected, notes = None, list(tr_a.notes)
    if inject is not None and config is not None:
        from apr_numba.debug.faults import plan_fault

        expected = plan_fault(inject, config, source).expected()
    return BisectResult(model, list(tr_a.tokens), a, b, inject, threshold, rows, first_divergence(rows), notes,
                        expected)


def _chain_rows(tr_a: Trace, tr_b: Trace, keys, threshold: float, cosine_only: bool) -> list[ChainRow]:
    rows = []
    for key in keys:
        xa, xb = tr_a.tensors[key], tr_b.tensors[key]
        if xa.size != xb.size:
            raise ArgumentError(f"stage {key[1]} (layer {key[0]}) has {xa.size} values on A, {xb.size} on B")
        d = diff_arrays(xa, xb, 0, key[0])
        ratio = norm_ratio(xa, xb)
        holds = d.max_abs_diff == 0.0 or (d.cosine >= threshold and (
            cosine_only or threshold <= ratio <= 1.0 / threshold))
        rows.append(ChainRow(key[0], key[1], d.cosine, d.max_abs_diff, ratio, bool(holds)))
    return rows


def _fmt_cos(c: float) -> str:
    return "nan" if math.isnan(c) else f"{c:.6f}"


def format_bisect(res: BisectResult, full: bool = False) -> str:
    """The report printed by ``apr-numba bisect``."""
    fault = f" [inject {res.inject}]" if res.inject else ""
    out = [f"bisect {Path(res.model).name}: A = {res.a}{fault}, B = {res.b}; {len(res.tokens)} tokens, "
           f"{len(res.rows)} stages, threshold {res.threshold}"]
    out += [f"note: {n}" for n in res.notes]
    rows = res.rows if full else res.window()
    if res.index is None:
        worst = min(res.rows, key=lambda r: r.cosine if not math.isnan(r.cosine) else -1)
        out.append(f"no divergence: every stage holds (lowest cosine {worst.cosine:.12f} at "
                   f"{'' if worst.layer is None else f'layer {worst.layer} '}{worst.stage})")
    else:
        r = res.rows[res.index]
        where = "whole-model" if r.layer is None else f"layer {r.layer}"
        prev = res.rows[res.index - 1] if res.index > 0 else None
        held = f"; previous stage {prev.stage} holds at {_fmt_cos(prev.cosine)}" if prev else "; first stage"
        why = "" if math.isnan(r.cosine) or r.cosine < res.threshold else f", |A|/|B| {r.norm_ratio:.4f}"
        out.append(f"first divergence: {where}, stage {r.stage} (cosine {_fmt_cos(r.cosine)}{why}{held})")
        st = SaveTensorStage(r.stage)
        out.append(f"  {r.stage}: llama.cpp {st.llama_cpp}; HF {st.hf}")
    if res.expected is not None:
        where = f"layer {res.expected[0]}, {res.expected[1]}"
        if res.index is None:
            out.append(f"the fault would enter at {where} but changed nothing there: latent for this input")
        elif res.expected == (res.layer, res.stage):
            out.append(f"fault enters at {where}: found")
        else:
            out.append(f"fault enters at {where}: NOT the named stage")
    if rows:
        out.append(f"  {'':1} {'layer':>5}  {'stage':<19} {'cosine':>9}  {'|A|/|B|':>8}  {'max_abs_diff':>12}")
        for r in rows:
            mark = ">" if res.index is not None and r is res.rows[res.index] else ""
            lay = "-" if r.layer is None else str(r.layer)
            out.append(f"  {mark:1} {lay:>5}  {r.stage:<19} {_fmt_cos(r.cosine):>9}  {r.norm_ratio:>8.4f}  "
                       f"{r.max_abs_diff:>12.5g}")
    return "\n".join(out)
