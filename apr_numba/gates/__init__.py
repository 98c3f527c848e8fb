"""Falsifiable gates: aprender's contracts (shared/docs/aprender-facts.md) measured now, on this machine and model.

::

    from apr_numba import gates
    results = gates.run("smollm2-135m", only="WS-*")     # list[GateResult]
    for r in results:
        print(r.id, r.status, r.value, r.unit, r.threshold, r.measured_at)

The gates are data (``registry.yaml``: id, rule, quantity, unit, comparison, threshold, contract); the function
that measures gate ``X-NNN`` is ``apr_numba.gates.<family>.x_nnn`` (families: :mod:`.ws`, :mod:`.enc`,
:mod:`.cpu_gpu`, :mod:`.attn_sub`). A verdict is PASS or FAIL from the measured value against the registry's
threshold, or NOT_APPLICABLE with the reason; never a constant. ``apr-numba gates`` is the command line.
docs/gates.md describes every measurement.

This package's ``__init__`` imports nothing heavy (the WS-002 cachegrind validation imports it under valgrind).
"""

from __future__ import annotations

from collections.abc import Callable

from apr_numba.gates.core import (
    FAIL,
    NOT_APPLICABLE,
    PASS,
    GateResult,
    GateSpec,
    Measured,
    NotApplicable,
    registry,
    run_gate,
    select,
    spec,
)
from apr_numba.hub.registry import DEFAULT_MODEL

__all__ = ["run", "GateResult", "GateSpec", "Measured", "NotApplicable", "registry", "spec", "select", "run_gate",
           "PASS", "FAIL", "NOT_APPLICABLE", "GateContext"]


def __getattr__(name: str):
    if name == "GateContext":
        from apr_numba.gates.context import GateContext

        return GateContext
    raise AttributeError(name)


def run(model=DEFAULT_MODEL, only=None, slow: bool = False,
        progress_cb: Callable[[GateResult], None] | None = None, *, encoder: str = "minilm-l6",
        threads: int | None = None, ctx=None) -> list[GateResult]:
    """Measure the gates (registry order) and return their results.

    Args:
        model: the decoder (registry name or path); an encoder makes the decoder gates NOT_APPLICABLE.
        only: gate ids / glob patterns / family prefixes, comma-separated or a list ("WS-*", "ENC,GWR-001");
            None = all.
        slow: longer measurements (more tokens and repetitions) for the gates that have them.
        progress_cb: called with each :class:`GateResult` as soon as it is measured (the dashboard's hook).
        encoder: the encoder for ENC-* (default minilm-l6).
        threads: kernel threads (default all cores).
        ctx: a :class:`~apr_numba.gates.context.GateContext` to reuse (loaded models), instead of the above.

    Returns:
        list of :class:`GateResult` in registry order.

    Raises:
        KeyError: ``only`` matches no gate.
    """
    from apr_numba.gates.context import GateContext

    specs = select(only)
    if not specs:
        raise KeyError(f"no gate matches {only!r} (ids: {', '.join(s.id for s in registry())})")
    ctx = ctx or GateContext(model, encoder=encoder, slow=slow, threads=threads)
    out = []
    for s in specs:
        r = run_gate(s, ctx)
        out.append(r)
        if progress_cb is not None:
            progress_cb(r)
    return out
