"""What the engine reports (plain dataclasses, no Textual): the app wraps each in a message (tui.messages);
the session file stores them as dicts (tui.fake rebuilds them)."""

from __future__ import annotations

import math
from dataclasses import dataclass

L1_THRESHOLD = 0.05  # WS-002: L1 data-cache miss rate < 5 %


@dataclass
class ModelInfo:
    """Facts for the model & machine panel (all read from the loaded model)."""

    name: str
    path: str
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    n_ctx: int
    quant_mix: dict
    file_bytes: int
    packed_bytes: int
    backend: str
    device: str
    threads: int
    threading_layer: str
    parity_line: str = ""
    load_s: float = 0.0
    has_chat_template: bool = False


@dataclass
class Status:
    """A line for the status bar (``kind``: "info", "shadow", "gates", "bisect", "warning")."""

    text: str
    kind: str = "info"


@dataclass
class Token:
    """One generated token: its index in this generation, id, text piece, seconds since the request, seconds
    since the previous token (None for the first), and the KV cache fill; the first token also carries the
    prefill rate and the time to first token of apr_numba's GenerationResult."""

    index: int
    token_id: int
    text: str
    elapsed_s: float
    dt_s: float | None
    n_past: int
    n_ctx: int
    prefill_tok_s: float | None = None
    ttft_s: float | None = None


@dataclass
class Parity:
    """Per-layer cosine (backend vs shadow block output) at sequence position ``position``.

    ``token``: index of the generated token that was fed at that position (None for a prompt position);
    ``lag``: positions the backend has computed beyond it; ``label``: what is compared.
    """

    position: int
    token: int | None
    cosines: list[float]
    lag: int
    label: str


@dataclass
class ShadowProgress:
    """Where the trailing shadow is: positions it has run, positions the backend holds, its last pass rate
    (positions per second of pass time, None before the first) and a word for its state."""

    position: int
    backend: int
    tok_s: float | None
    state: str

    @property
    def behind(self) -> int:
        return max(0, self.backend - self.position)


@dataclass
class Done:
    """A generation finished: GenerationResult fields (+ ``fallback`` when it moved backend)."""

    result: dict


@dataclass
class Failed:
    """Something failed: ``where`` (load, generate, shadow, gates, bisect), why, and what happens now."""

    where: str
    reason: str
    fallback: str | None = None


@dataclass
class GateRow:
    """One gate result as measured (``apr_numba.gates.GateResult``'s fields): id, status (PASS / FAIL /
    NOT_APPLICABLE), the value in ``unit`` against ``comparison`` ``threshold``, and the detail or reason."""

    id: str
    status: str
    value: float | None = None
    unit: str = ""
    comparison: str = ""
    threshold: float | list | None = None
    detail: str = ""


@dataclass
class L1Reading:
    """The L1-miss proxy for the running kernels: a fraction (0.031 = 3.1 %), where it came from."""

    value: float | None
    source: str
    detail: str = ""
    threshold: float = L1_THRESHOLD


@dataclass
class Bisected:
    """Bisection of the last prompt: one summary line, the named stage (None: no divergence)."""

    summary: str
    layer: int | None
    stage: str | None
    cosine: float | None
    a: str
    b: str


@dataclass
class Loaded:
    info: ModelInfo
    shadow: str
    shadow_label: str


def fmt_cos(c: float) -> str:
    """A cosine readable near 1: "1-3e-07" (= 1 - 3e-07), else 6 decimals."""
    if math.isnan(c):
        return "nan"
    return f"1-{1 - c:.0e}" if 0 < 1 - c < 1e-5 else f"{c:.6f}"


def gate_row(r) -> GateRow:
    """A :class:`GateRow` from an ``apr_numba.gates.GateResult`` (or a dict with its fields)."""
    get = r.get if isinstance(r, dict) else (lambda k, d=None: getattr(r, k, d))
    value, thr = get("value"), get("threshold")
    if value is not None:
        value = float(value) if math.isfinite(float(value)) else None
    if isinstance(thr, (list, tuple)):
        thr = [float(x) for x in thr]
    elif thr is not None:
        thr = float(thr)
    return GateRow(id=str(get("id", "?")), status=str(get("status", "?")), value=value, unit=str(get("unit", "")),
                   comparison=str(get("comparison", "")), threshold=thr,
                   detail=str(get("reason") or get("detail") or ""))


def gates_summary(rows: list[GateRow]) -> str:
    """"24 gates: 2 FAIL (WS-002, WS-004), 21 PASS, 1 N/A" (the failing ids named)."""
    fails = [r.id for r in rows if r.status == "FAIL"]
    n_pass = sum(r.status == "PASS" for r in rows)
    n_na = sum(r.status == "NOT_APPLICABLE" for r in rows)
    head = f"{len(rows)} gates: "
    parts = ([f"{len(fails)} FAIL ({', '.join(fails)})"] if fails else []) + [f"{n_pass} PASS"]
    return head + ", ".join(parts + ([f"{n_na} N/A"] if n_na else []))
