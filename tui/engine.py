"""The thin adapter between the dashboard and apr_numba: load, generate with per-token layer capture, the
shadow, bisect, gates, the L1 proxy and the session record. Nothing here imports textual.

Every long call runs in one of the app's thread workers and reports through ``emit(event)``, where an event
is one of the dataclasses below; the app turns each into a Textual message. ``cancelled()`` is the worker's
``is_cancelled``.

Generation reuses :func:`apr_numba.generation.generate.generate_events` (sampling, stop rules, timings) on a stand-in
model whose ``eval`` always asks for ``capture_layers=True``, so every prefill and decode step hands its
block outputs (post_ffn_residual, (n_layer, k, n_embd)) to the shadow's queue (:mod:`tui.trail`) without
waiting. The shadow worker runs that queue only in idle time (no generation, gate or bisect running), at the
lowest CPU priority, so generation runs at the engine's own speed; the shadow catches up after each reply.

A run keeps the KV cache positions it shares with the previous run (generate_events' ``reuse``, the API's
own prefix reuse; :mod:`tui.chat`): a chat turn prefills only its new tokens. Model jobs (generation, gates,
bisect) run one at a time (:class:`Jobs`), so they never share the model's KV cache or time each other; the
gates measure only when the shadow has caught up.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tui.events import (
    Bisected,
    Done,
    Failed,
    GateRow,
    L1Reading,
    Loaded,
    ModelInfo,
    Status,
    Token,
    fmt_cos,
    gate_row,
    gates_summary,
)

SESSION_SCHEMA = "apr-tui-session-v1"

Emit = Callable[[object], None]
Cancelled = Callable[[], bool]


class Jobs:
    """One model job at a time; generation and bisect go before the gates, which run one gate per turn.

    A waiting generation therefore starts as soon as the gate being measured finishes, and no gate ever
    times itself against a running generation.
    """

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.running: str | None = None
        self.urgent = 0  # priority jobs waiting

    @contextmanager
    def job(self, name: str, priority: bool, on_wait: Callable[[str], None] | None = None):
        with self.cv:
            self.urgent += priority
            try:
                while self.running is not None or (not priority and self.urgent):
                    if on_wait is not None and self.running is not None:
                        on_wait(self.running)
                        on_wait = None
                    self.cv.wait()
            finally:
                self.urgent -= priority
            self.running = name
        try:
            yield
        finally:
            with self.cv:
                self.running = None
                self.cv.notify_all()


class _Capturing:
    """The model as generate_events sees it, except that every eval captures the block outputs and hands
    them (with the ids evaluated) to ``sink``. Prefix reuse is generate_events' own (``reuse=True``)."""

    def __init__(self, model, sink):
        self._model, self._sink = model, sink

    def __getattr__(self, name):
        return getattr(self._model, name)

    def eval(self, ids, n_logits: int = 1, capture_layers: bool = False, state=None):
        logits, cap = self._model.eval(ids, n_logits, capture_layers=True, state=state)
        self._sink(ids, cap)
        return (logits, cap) if capture_layers else logits


@dataclass
class _Gen:
    """The record of one generation (kept for the session file)."""

    prompt: str
    chat: bool
    prompt_ids: list[int]
    tokens: list[dict] = field(default_factory=list)
    parity: list[dict] = field(default_factory=list)
    result: dict = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)
    reused: int = 0  # KV cache positions kept from the previous run (not prefilled again)

    @property
    def text(self) -> str:
        return "".join(t["text"] for t in self.tokens)


# ------------------------------------------------------------------------------------------------ engine
class Engine:
    """The real engine: an apr_numba model, a shadow, and the session record.

    Args:
        model: registry name or .gguf / .apr path (already resolved by the caller, or resolved here).
        backend: "auto", "cpu" or "opencl" (apr_numba.load).
        shadow: "auto", "reference", "cpu", "opencl" or "off" (see tui.shadow).
        threads, n_ctx: as apr_numba.load.
        temperature, seed: sampling (0 = greedy).
    """

    replay = False

    def __init__(self, model: str = "smollm2-135m", backend: str = "auto", shadow: str = "auto",
                 threads: int | None = None, n_ctx: int | None = None, temperature: float = 0.0,
                 seed: int | None = None, system: str | None = None, shadow_budget_bytes: int | None = None):
        from tui.chat import Conversation
        from tui.trail import Trail

        self.spec, self.backend_req, self.shadow_req = model, backend, shadow
        self.shadow_budget = shadow_budget_bytes
        self.conversation = Conversation(system or None)
        self.trail = Trail()
        self.threads, self.n_ctx, self.temperature, self.seed = threads, n_ctx, temperature, seed
        self.model = None
        self.info: ModelInfo | None = None
        self.shadow = None
        self.shadow_kind = "off"
        self.shadow_label = "shadow off (--shadow off): no per-layer parity is computed"
        self.jobs = Jobs()
        self._gen: _Gen | None = None
        self.shadow_ready = threading.Event()  # set once the shadow is prepared (or failed / off)
        self.history: list[_Gen] = []
        self.gates: dict[str, GateRow] = {}
        self.l1: L1Reading | None = None
        self.bisects: list[dict] = []
        self._gate_proc = None  # the gate child while a gate run is on (tui.gate_process)

    # -- load ----------------------------------------------------------------------------------
    def load(self, emit: Emit) -> Loaded:
        """Load the model (blocking) and pick the shadow; returns (and emits) :class:`Loaded`."""
        from apr_numba import runtime as config
        from apr_numba.model.decoder import load

        emit(Status(f"loading {self.spec} ..."))
        m = self.model = load(self.spec, backend=self.backend_req, threads=self.threads, n_ctx=self.n_ctx)
        if not hasattr(m, "eval") or not hasattr(m, "tokenizer"):
            raise TypeError(f"{self.spec} is not a decoder model (an encoder cannot generate)")
        c = m.config
        parity = ""
        if m.parity is not None:
            from apr_numba.backends.parity import TAG

            if m.parity.passed:
                cos = ", ".join(f"{x:.6f}" for x in m.parity.cosines)
                parity = f"parity gate passed on {m.parity.device} ({len(m.parity.cosines)} steps, cosines {cos})"
            else:
                parity = f"{TAG} OpenCL path rejected, attempting fallback: {m.parity.reason}"
        meta = getattr(m.source, "metadata", {}) or {}
        self.info = ModelInfo(
            name=str(c.name or m.path.stem), path=str(m.path), arch=c.arch, n_layer=c.n_layer, n_embd=c.n_embd,
            n_head=c.n_head, n_head_kv=c.n_head_kv, n_ff=c.n_ff, n_vocab=c.n_vocab, n_ctx=m.n_ctx,
            quant_mix=dict(m.weights.quant_mix), file_bytes=m.path.stat().st_size,
            packed_bytes=int(m.weights.packed_bytes), backend=m.backend, device=str(m.device), threads=m.threads,
            threading_layer=config.threading_layer(), parity_line=parity, load_s=round(m.load_stats.total_s, 3),
            has_chat_template=bool(meta.get("tokenizer.chat_template")))
        self._pick_shadow(emit)
        ev = Loaded(self.info, self.shadow_kind, self.shadow_label)
        emit(ev)
        return ev

    def _pick_shadow(self, emit: Emit) -> None:
        from tui.shadow import ShadowUnavailable, default_shadow, make_shadow

        kind = default_shadow(self.model) if self.shadow_req == "auto" else self.shadow_req
        try:
            self.shadow = make_shadow(kind, self.model, self.shadow_budget)
        except ShadowUnavailable as exc:
            emit(Failed("shadow", str(exc), "per-layer parity off"))
            self.shadow, kind = None, "off"
        self.shadow_kind = kind
        if self.shadow is not None:
            self.shadow_label = self.shadow.label
        else:
            self.shadow_label = f"shadow off{' (--shadow off)' if self.shadow_req == 'off' else ''}: " \
                                f"no per-layer parity is computed"

    def close(self) -> None:
        """End the gate child if a gate run is on (the app's unmount; FakeEngine has the same)."""
        proc = self._gate_proc
        if proc is not None:
            proc.close()

    # -- generation ----------------------------------------------------------------------------
    def _captured(self, gen: _Gen, ids, cap: np.ndarray) -> None:
        """Called after each backend eval: queue (ids, block outputs) for the trailing shadow (never waits)."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        if self.shadow is not None:
            self.trail.push(gen, self.model.n_past - ids.size, ids, cap)

    def prompt_ids(self, prompt: str, chat: bool) -> list[int]:
        """The ids to run: in chat mode the whole conversation plus ``prompt`` as the new user turn."""
        from apr_numba.generation.generate import prompt_ids

        return self.conversation.render(self.model, prompt) if chat else prompt_ids(self.model, prompt, False)

    def new_conversation(self, system: str | None = None) -> None:
        """Start the chat over with a system prompt (None: none). The KV cache is kept: the next turn reuses
        whatever prefix it shares (the system prompt's tokens, when it is the same)."""
        self.conversation.reset(system)

    def generate(self, prompt: str, chat: bool, max_tokens: int, emit: Emit, cancelled: Cancelled) -> dict:
        """Generate from ``prompt`` (blocking), emitting Token / Failed / Done; returns the result dict.

        The KV cache positions shared with the previous run are kept (``result["reused"]``) and only the rest
        is prefilled (``result["prefilled"]``); in chat mode the turn joins the conversation. If the backend
        raises mid-way, the tokens so far are kept; on OpenCL the model falls back to the CPU and generation
        continues from the text so far (a fresh prefill of prompt + generated tokens).
        """
        from apr_numba.errors import AprError
        from apr_numba.runtime import set_threads

        m = self.model
        with self.jobs.job("generation", True, lambda job: emit(Status(f"waiting for {job} to finish ..."))), \
                self.trail.foreground():
            set_threads(m.threads)  # Numba's thread count is per thread: this worker's
            t0 = time.perf_counter()
            try:
                ids = self.prompt_ids(prompt, chat)
            except AprError as exc:  # e.g. chat mode without a template
                emit(Failed("generate", str(exc)))
                emit(Done(out := {"text": "", "stop_reason": "error", "token_ids": []}))
                return out
            gen = self._gen = _Gen(prompt, chat, ids)
            self.history.append(gen)
            res, fallback = self._run_with_fallback(gen, max_tokens, emit, cancelled, t0)
            produced = [t["token_id"] for t in gen.tokens if t["token_id"] >= 0]
            if chat and res.stop_reason != "error":
                self.conversation.add_turn(prompt, gen.text)
            out = res.to_dict()
            out.update(text=gen.text, token_ids=produced, prompt_token_ids=list(ids), total_s=time.perf_counter() - t0,
                       reused=gen.reused, prefilled=len(ids) - gen.reused, turn=self.conversation.turns)
            if fallback:
                out["fallback"] = fallback
            gen.result = out
            emit(Done(out))
            return out

    def _run_with_fallback(self, gen: _Gen, max_tokens: int, emit: Emit, cancelled: Cancelled, t0: float):
        """generate_events until done; after a backend failure, on the CPU from the tokens so far (if it can)."""
        from apr_numba.errors import AprError
        from apr_numba.generation.generate import GenerationResult
        from apr_numba.generation.sampling import SamplingParams

        m = self.model
        params = SamplingParams(temperature=self.temperature, seed=self.seed)
        fallback = None
        while True:
            produced = [t["token_id"] for t in gen.tokens if t["token_id"] >= 0]
            res = GenerationResult()
            try:
                self._stream(gen, gen.prompt_ids + produced, params, max_tokens - len(produced), res, emit,
                             cancelled, t0)
                return res, fallback
            except AprError as exc:  # a user error (prompt too long for the context...): nothing to retry
                emit(Failed("generate", str(exc)))
                res.stop_reason = "error"
                return res, fallback
            except Exception as exc:  # noqa: BLE001 - a backend failure: report, fall back if possible
                reason = f"{m.backend} backend failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                gen.failures.append({"reason": reason, "after_tokens": len(produced)})
                if m.backend == "cpu" or not self._fallback_to_cpu():
                    emit(Failed("generate", reason, f"no fallback (already on the CPU); {len(produced)} tokens kept"))
                    res.stop_reason = "error"
                    return res, fallback
                fallback = f"fell back to the CPU (Numba) after {len(produced)} tokens"
                emit(Failed("generate", reason, fallback + "; continuing from the text so far"))
                self.info.backend, self.info.device = m.backend, str(m.device)
                if len(produced) >= max_tokens or cancelled():
                    res.stop_reason = "cancelled" if cancelled() else "length"
                    return res, fallback

    def _stream(self, gen: _Gen, ids: list[int], params, max_tokens: int, res, emit: Emit, cancelled: Cancelled,
                t0: float) -> None:
        """One generate_events run on a fresh sequence, every step's block outputs queued for the shadow."""
        from apr_numba.generation.generate import generate_events

        m = self.model
        first = not gen.tokens
        proxy = _Capturing(m, lambda i, c: self._captured(gen, i, c))
        last_t = t0 + gen.tokens[-1]["elapsed_s"] if gen.tokens else None
        # reuse: the KV cache keeps the prefix these ids share with what it holds (KVState.tokens), as in the API
        try:
            for ev in generate_events(proxy, ids, params, max_tokens, (), res, cancelled=cancelled, reuse=True):
                now = time.perf_counter()
                tok = Token(len(gen.tokens), ev.token_id, ev.text, now - t0,
                            None if last_t is None else now - last_t, m.n_past, m.n_ctx)
                if last_t is None:
                    tok.prefill_tok_s, tok.ttft_s = res.prefill_tok_s, res.time_to_first_token_s
                last_t = now
                gen.tokens.append(asdict(tok))
                emit(tok)
        finally:
            if first:  # a rerun after a fallback starts on a fresh CPU cache: the first run's count stands
                gen.reused = res.n_reused

    def _fallback_to_cpu(self) -> bool:
        """Move the model off OpenCL onto its CPU path (fresh CPU KV cache)."""
        m = self.model
        try:
            m.use_cpu()
        except Exception:  # noqa: BLE001 - cannot fall back
            return False
        return True

    # -- shadow --------------------------------------------------------------------------------
    def shadow_loop(self, emit: Emit, cancelled: Cancelled) -> None:
        """Open the shadow, then run the trail (:class:`tui.trail.Trail`) until cancelled (its own worker)."""
        from apr_numba.runtime import set_threads
        from tui.shadow import ShadowUnavailable

        sh = self.shadow
        if sh is None:
            self.shadow_ready.set()
            return
        set_threads(self.model.threads)
        try:
            sh.prepare()
        except (ShadowUnavailable, Exception) as exc:  # noqa: BLE001 - shadow broken: say so, keep generating
            self.shadow = None
            self.shadow_label = f"shadow {sh.kind} unavailable: {exc}"
            emit(Failed("shadow", f"{type(exc).__name__}: {exc}", "per-layer parity off"))
            return
        finally:
            self.shadow_ready.set()
        self.shadow_label = sh.label
        emit(Status(f"shadow {sh.kind} ready: {sh.label}; it trails the backend and runs when idle", "shadow"))
        self.trail.run(sh, emit, cancelled)

    # -- bisect --------------------------------------------------------------------------------
    def bisect(self, emit: Emit) -> Bisected | None:
        """Bisect the last prompt: the backend against the shadow (the reference when the shadow is off)."""
        from apr_numba.debug.bisection import bisect

        if not self.history:
            emit(Status("bisect: no prompt yet (generate first)", "bisect"))
            return None
        ids = self.history[-1].prompt_ids
        a = "opencl" if self.model.backend == "opencl" else "cpu"
        b = self.shadow_kind if self.shadow_kind in ("reference", "cpu", "opencl") else "reference"
        from apr_numba.runtime import set_threads

        with self.jobs.job("bisect", True, lambda job: emit(Status(f"bisect: waiting for {job} ...", "bisect"))), \
                self.trail.foreground():
            set_threads(self.model.threads)
            emit(Status(f"bisect: tracing every stage of {len(ids)} prompt tokens on {a} and {b} ...", "bisect"))
            res = bisect(self.model, tokens=ids, a=a, b=b)  # on its own KV states: the model's cache is kept
        head = f"bisect {a} vs {b}, {len(ids)} prompt tokens, {len(res.rows)} stages:"
        if res.diverged:
            r = res.rows[res.index]
            where = "whole-model" if r.layer is None else f"layer {r.layer}"
            summary = f"{head} first divergence at {where} {r.stage} (cosine {fmt_cos(r.cosine)} < {res.threshold})"
            out = Bisected(summary, r.layer, r.stage, r.cosine, a, b)
        else:
            worst = min(res.rows, key=lambda r: r.cosine if not math.isnan(r.cosine) else -1)
            lay = "" if worst.layer is None else f"layer {worst.layer} "
            note = "; same kernels on both sides" if a == b else ""
            summary = (f"{head} no divergence (lowest cosine {fmt_cos(worst.cosine)} at {lay}{worst.stage}){note}")
            out = Bisected(summary, None, None, None, a, b)
        self.bisects.append(asdict(out))
        emit(out)
        return out

    # -- gates and the L1 proxy ----------------------------------------------------------------
    @staticmethod
    def gates_module():
        """``apr_numba.gates`` when it exists, else None."""
        try:
            import apr_numba.gates as gates
        except ImportError:
            return None
        return gates if callable(getattr(gates, "run", None)) else None

    def gates_note(self) -> str | None:
        """None when the gates module can run, else why the gates panel is empty."""
        return None if self.gates_module() is not None else "apr_numba.gates is not available in this build"

    def run_gates(self, emit: Emit, cancelled: Cancelled) -> list[GateRow]:
        """Measure the fast gates (registry order, short measurements), emitting a GateRow as each arrives.

        The gates measure in a child process (:mod:`tui.gate_process`: their own load of the same file, ended
        after the run so their memory goes back to the OS), never on the dashboard's KV cache; :class:`Jobs`
        runs one gate per turn and never beside a generation.
        """
        from tui.gate_process import GateProcess, GateProcessError

        gates = self.gates_module()
        if gates is None:
            emit(Status(f"gates: {self.gates_note()}", "gates"))
            return []
        rows: list[GateRow] = []
        specs = gates.select(None)
        proc = None
        try:
            for i, spec in enumerate(specs):
                if cancelled() or not self.trail.wait_idle(cancelled):  # gates measure in idle time only
                    break
                with self.jobs.job(f"gate {spec.id}", False), self.trail.foreground():
                    emit(Status(f"gates: measuring {spec.id} ({i + 1}/{len(specs)}) ...", "gates"))
                    if proc is None:
                        proc = self._gate_proc = GateProcess(self.model.path, threads=self.threads)
                    row = gate_row(proc.measure(spec.id))
                rows.append(row)
                self.gates[row.id] = row
                emit(row)
        except GateProcessError as exc:
            if not cancelled():
                emit(Failed("gates", str(exc), f"{len(rows)} of {len(specs)} gates measured"))
        finally:
            if proc is not None:
                proc.close()
                self._gate_proc = None
        emit(Status(gates_summary(list(self.gates.values())), "gates"))
        return rows

    def measure_l1(self, emit: Emit) -> L1Reading | None:
        """The WS-002 L1-miss proxy (``apr_numba.gates.l1proxy.model_proxy``) of this model's decode matmuls."""
        try:
            from apr_numba.gates.l1proxy import model_proxy
        except ImportError:
            emit(L1Reading(None, "", "apr_numba.gates.l1proxy is not available in this build"))
            return None
        with self.jobs.job("L1 proxy", False), self.trail.foreground():  # never beside a generation
            r = model_proxy(self.model.weights)
        kernels = r.details.get("per_kernel", {})
        worst = max(kernels.items(), key=lambda kv: kv[1]["load_miss_rate"]) if kernels else None
        detail = f"footprint {r.footprint_bytes / 1024:.1f} KiB"
        if worst is not None:
            detail += f", worst {worst[0]} {worst[1]['load_miss_rate']:.2%}"
        src = "Numba decode matmuls" + (" (the backend runs OpenCL)" if self.model.backend != "cpu" else "")
        self.l1 = L1Reading(float(r.miss_rate), src, detail)
        emit(self.l1)
        return self.l1

    # -- session -------------------------------------------------------------------------------
    def session(self) -> dict:
        """The session as a JSON-able dict (schema apr-tui-session-v1): model, shadow, every generation with
        its tokens, per-position parity and result, gates, L1, bisections."""
        return {
            "schema": SESSION_SCHEMA, "saved_unix": round(time.time(), 3),
            "model": asdict(self.info) if self.info else None,
            "shadow": {"kind": self.shadow_kind, "label": self.shadow_label},
            "generations": [asdict(g) | {"text": g.text} for g in self.history],
            "conversation": self.conversation.to_dict(),
            "gates": [asdict(r) for r in dict(self.gates).values()], "l1": asdict(self.l1) if self.l1 else None,
            "bisects": list(self.bisects), "gates_note": self.gates_note(),
        }

    def save(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.session(), indent=1, ensure_ascii=False, allow_nan=False, default=_nan_safe))
        return path


def _nan_safe(o):  # pragma: no cover - json default hook for numpy scalars
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(type(o).__name__)
