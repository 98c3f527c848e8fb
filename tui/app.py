"""``apr-tui [MODEL]``: watch a model write, with each layer's parity, the speed, the L1 proxy and the gates.

The app owns view state only. Work runs in thread workers (``@work(thread=True)``) that call the engine
(:mod:`tui.engine`, or :mod:`tui.fake` replaying a saved session) and post one message per event; handlers
store what arrived and mark panels dirty, and a timer redraws dirty panels at most ``refresh_hz`` times a
second, so a fast token stream never floods the screen and keys stay responsive.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from pathlib import Path

from rich.text import Text
from textual import events, on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.reactive import reactive
from textual.widgets import Footer, Header, Static
from textual.worker import Worker, WorkerState, get_current_worker

from tui import messages as M
from tui.actions import DashboardActions
from tui.history import HistoryPanel
from tui.widgets import (
    GatesPanel,
    L1Gauge,
    LayerCells,
    ModelPanel,
    OutputView,
    PromptArea,
    SpeedPanel,
    display_name,
)

GEN_REFRESH_HZ = 4.0  # redraws per second while generating (Dashboard.gen_refresh_hz)
EXAMPLE_PROMPT = "e.g. Explain what a KV cache is, in one sentence."  # the empty prompt box's placeholder


class StatusLine(Static):
    """One line: mode, state, and the latest note; remembers when and what it last rendered (latency test)."""

    rendered: tuple[float, str] = (0.0, "")

    def render(self):
        self.rendered = (time.perf_counter(), str(getattr(self.content, "plain", self.content)))
        return super().render()


class Dashboard(DashboardActions, App):
    """The apr-numba dashboard.

    Args:
        engine: a :class:`tui.engine.Engine` (or :class:`tui.fake.FakeEngine`), not yet loaded.
        max_tokens: most tokens per generation. prompt: initial prompt text ("" = empty box with a
        placeholder). chat: start in chat mode. gates_at_start: measure the fast gates once the model is loaded,
        in idle time (they wait for generations and for the shadow to catch up). save_dir: where Save writes.
        refresh_hz: most redraws per second of the streaming panels; gen_refresh_hz: the same while a
        generation runs (each redraw's Python on the UI thread takes a core's time slice from the engine's
        parallel kernels, which then wait at their barriers). theme: a Textual theme name.

    Keys: the prompt box has the focus and takes every printable key; Enter sends, Escape leaves it (or stops
    a generation), after which single letters are commands; ctrl+ shortcuts work everywhere.
    """

    CSS_PATH = "app.tcss"
    TITLE = "apr-tui"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-wide")]
    BINDINGS = [
        Binding("escape", "escape", "Stop/keys", key_display="esc"),
        Binding("ctrl+t", "toggle_chat", "Chat"),
        Binding("ctrl+n", "new_chat", "New"),
        Binding("ctrl+g", "gates", "Gates"),
        Binding("ctrl+r", "bisect", "Bisect"),
        Binding("ctrl+s", "save", "Save"),
        Binding("f1", "help", "Help"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
        # single letters: only reach the app when the prompt box does not have the focus (it types them)
        Binding("enter", "generate", "Generate", show=False),
        Binding("i", "focus_prompt", "Prompt", show=False),
        Binding("c", "toggle_chat", "Chat", show=False),
        Binding("n", "new_chat", "New", show=False),
        Binding("b", "bisect", "Bisect", show=False),
        Binding("g", "gates", "Gates", show=False),
        Binding("s", "save", "Save", show=False),
        Binding("q", "quit", "Quit", show=False),
        Binding("question_mark", "help", "Help", key_display="?", show=False),
    ]

    generating = reactive(False)
    chat = reactive(False)
    note = reactive("loading the model ...")

    def __init__(self, engine, max_tokens: int = 256, prompt: str = "", chat: bool = False,
                 gates_at_start: bool = True, save_dir: str | os.PathLike = ".", refresh_hz: float = 20.0,
                 theme: str | None = None, gen_refresh_hz: float = GEN_REFRESH_HZ):
        super().__init__()
        if theme:
            self.theme = theme
        self.engine = engine
        self.max_tokens, self.initial_prompt, self.gates_at_start = max_tokens, prompt, gates_at_start
        self.save_dir, self.refresh_hz, self.gen_refresh_hz = Path(save_dir), refresh_hz, gen_refresh_hz
        self._last_flush = 0.0
        self.set_reactive(Dashboard.chat, chat)
        self.loaded = None  # the Loaded event
        self.last_save: Path | None = None
        self.last_bisect = None
        self.failures: list = []
        self.transcript = ""  # the chat's earlier turns, as shown
        self.gen_chat = False  # the running / last generation was a chat turn
        self.send_when_loaded = False  # Enter was pressed while loading
        self.shadow_progress = None  # the latest ShadowProgress
        self._reset_view("")
        self._dirty: set[str] = set()

    # -- layout ----------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header(show_clock=False, icon="◆")
        with Horizontal(id="main"):
            with Vertical(id="left"):
                yield PromptArea(text=self.initial_prompt, placeholder=EXAMPLE_PROMPT, id="prompt")
                yield OutputView(id="output")
                yield LayerCells(id="cells")
                yield HistoryPanel(id="history")
            with Vertical(id="right"):
                yield ModelPanel("loading ...", id="model")
                yield SpeedPanel(id="speed")
                yield L1Gauge(id="l1")
                yield GatesPanel(id="gates")
        yield StatusLine(id="status")
        yield Footer(show_command_palette=False, compact=True)

    def on_mount(self) -> None:
        self.query_one("#prompt").border_title = "prompt: Enter sends · ctrl+j new line · ↑↓ history · Esc, then keys"
        self.query_one("#output").border_title = "output"
        self.query_one("#model").border_title = "model & machine"
        self.query_one("#speed").border_title = "speed"
        self.query_one("#l1").border_title = "L1-miss proxy (WS-002)"
        self.query_one("#gates").border_title = "gates"
        self.query_one("#cells", LayerCells).border_title = "per-layer cosine (post_ffn_residual)"
        self.query_one("#history").border_title = "cosine history over the generated tokens (1 − cos)"
        self.action_focus_prompt()  # typing goes to the prompt from the start; Escape leaves it
        self.sub_title = getattr(self.engine, "spec", "") or ""
        self.set_interval(1 / self.refresh_hz, self.flush)
        self._update_status()
        self.load_model()

    def on_resize(self, event: events.Resize) -> None:
        compact = event.size.width < 100 or event.size.height < 30
        cells = self.query_one("#cells")
        cells.set_class(compact, "compact")
        cells.set_class(not compact, "legend")
        for panel in (ModelPanel, SpeedPanel, L1Gauge, GatesPanel, HistoryPanel):
            self.query_one(panel).set_compact(compact)

    # -- view state and the throttled redraw -----------------------------------------------------
    def _reset_view(self, prompt: str) -> None:
        self.shown_prompt = prompt
        self.output: list[str] = []
        self.tokens: list = []
        self.n_generated = 0
        self.rates: list[float] = []
        self.parity = None
        self.n_prompt: int | None = None  # positions before the first generated token (from its n_past)
        self.cos_history: dict[int, list[float]] = {}  # generated token index -> per-layer cosines
        self.prefill = self.ttft = self.decode = None
        self.kv = None
        self.result: dict | None = None

    def mark(self, *panels: str) -> None:
        self._dirty.update(panels)

    def flush(self) -> None:
        """Redraw the panels whose data changed since the last flush (at most ``gen_refresh_hz`` times a second
        while generating: every redraw costs the engine about twice its own CPU time, see the class docstring)."""
        now = time.monotonic()
        if self.generating and now - self._last_flush < 1 / self.gen_refresh_hz:
            return
        self._last_flush = now
        dirty, self._dirty = self._dirty, set()
        try:
            self._redraw(dirty)
        except NoMatches:  # the main screen is covered (help) or being torn down: redraw once it is back
            self._dirty |= dirty

    def _redraw(self, dirty: set[str]) -> None:
        """Redraw the named panels on the main screen; raises ``NoMatches`` while another screen is on top."""
        if "output" in dirty:
            note = ""
            if self.result is not None:
                note = f"{self.n_generated} tokens, stop={self.result.get('stop_reason', '?')}"
                if self.result.get("fallback"):
                    note += f"; {self.result['fallback']}"
            self.query_one(OutputView).show(self.shown_prompt, "".join(self.output), self.generating, note)
        if "speed" in dirty:
            self.query_one(SpeedPanel).show(self.rates, self.prefill, self.ttft, self.n_generated, self.decode, self.kv,
                                            self.shadow_line())
        if "history" in dirty:
            self.query_one(HistoryPanel).show(self.cos_history, self.n_generated)
        if "cells" in dirty and self.parity is not None:
            p = self.parity
            text = self.tokens[p.token].text if p.token is not None and p.token < len(self.tokens) else None
            self.query_one(LayerCells).show(p, text, p.label)

    def _update_status(self) -> None:
        mode = "chat" if self.chat else "text"
        state = "generating" if self.generating else ("ready" if self.loaded else "loading")
        t = Text()
        t.append(f" {mode} ", style="reverse")
        t.append(f" {state} ", style="bold black on green" if self.generating else "bold")
        t.append(" " + self.note)
        self.query_one(StatusLine).update(t)

    def watch_chat(self) -> None:
        if self.is_mounted:
            self._update_status()

    def watch_generating(self) -> None:
        if self.is_mounted:
            self._update_status()
            self.mark("output")

    def watch_note(self) -> None:
        if self.is_mounted:
            self._update_status()

    # -- workers ---------------------------------------------------------------------------------
    def _emit(self, event) -> None:
        self.post_message(M.wrap(event))

    def _cancelled(self):
        worker = get_current_worker()
        return lambda: worker.is_cancelled

    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def load_model(self) -> None:
        self.engine.load(self._emit)

    @work(thread=True, exclusive=True, group="shadow", exit_on_error=False)
    def run_shadow(self) -> None:
        self.engine.shadow_loop(self._emit, self._cancelled())

    @work(thread=True, exclusive=True, group="generate", exit_on_error=False)
    def run_generate(self, prompt: str, chat: bool) -> None:
        self.engine.generate(prompt, chat, self.max_tokens, self._emit, self._cancelled())

    @work(thread=True, exclusive=True, group="gates", exit_on_error=False)
    def run_gates(self) -> None:
        self.engine.run_gates(self._emit, self._cancelled())

    @work(thread=True, exclusive=True, group="l1", exit_on_error=False)
    def run_l1(self) -> None:
        wait = getattr(self.engine, "trail", None)
        if wait is not None and not wait.wait_idle(self._cancelled()):  # a measurement: in idle time only
            return
        self.engine.measure_l1(self._emit)

    @work(thread=True, exclusive=True, group="bisect", exit_on_error=False)
    def run_bisect(self) -> None:
        self.engine.bisect(self._emit)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR:
            err = event.worker.error
            self._failed(event.worker.group, f"{type(err).__name__}: {err}", None)
            if event.worker.group == "generate":
                self.generating = False

    # -- engine messages -------------------------------------------------------------------------
    def on_model_loaded(self, msg: M.ModelLoaded) -> None:
        # Everything alive now (the model, Numba, Textual) moves out of the collector's reach: a full
        # collection over it paused the event loop for ~100 ms mid-generation.
        gc.collect()
        gc.freeze()
        ev = self.loaded = msg.event
        info = ev.info
        self.title = f"apr-tui · {display_name(info.name, info.path)}"
        self.sub_title = f"{info.backend} · shadow {ev.shadow}"
        self.query_one(ModelPanel).show(info, ev.shadow)
        self.query_one(LayerCells).setup(info.n_layer, ev.shadow_label, ev.shadow == "off")
        self.note = f"loaded in {info.load_s:.1f} s: type a prompt, Enter sends; Esc then ? lists the keys"
        self.run_shadow()
        if not self.engine.replay:
            self.query_one(L1Gauge).show(None, "measures when idle ...")
            self.run_l1()
        if self.send_when_loaded:
            self.action_generate()
        note = self.engine.gates_note()
        gates = self.query_one(GatesPanel)
        if note is not None:
            gates.note(note)
        elif self.gates_at_start:
            gates.note("the fast gates measure when idle ...")
            self.run_gates()
        else:
            gates.note("ctrl+g measures the fast gates")

    def on_engine_status(self, msg: M.EngineStatus) -> None:
        ev = msg.event
        if ev.kind == "shadow":  # preparation progress belongs to the cells panel
            cells = self.query_one(LayerCells)
            if cells.parity is None:
                cells.where = ev.text
                cells.refresh()
            return
        if ev.kind == "gates":
            self.query_one(GatesPanel).note(ev.text)
            if self.generating:
                return
        self.note = ev.text

    def on_token_generated(self, msg: M.TokenGenerated) -> None:
        ev = msg.event
        self.tokens.append(ev)
        self.output.append(ev.text)
        if ev.prefill_tok_s is not None:
            self.prefill = ev.prefill_tok_s
        if ev.ttft_s is not None:
            self.ttft = ev.ttft_s
        if self.n_prompt is None:
            self.n_prompt = ev.n_past  # after the prefill: the prompt's positions
        if ev.token_id >= 0:  # (-1: the decoder's flushed tail, not a token)
            self.n_generated += 1
            if ev.dt_s:
                self.rates.append(1.0 / ev.dt_s)
                # tokens after the first over the time since the first (GenerationResult's decode rate)
                self.decode = (self.n_generated - 1) / (ev.elapsed_s - self.tokens[0].elapsed_s)
        self.kv = (ev.n_past, ev.n_ctx)
        self.mark("output", "speed")

    def on_layer_parity(self, msg: M.LayerParity) -> None:
        p = self.parity = msg.event
        if self.n_prompt is not None and p.position >= self.n_prompt and p.token == p.position - self.n_prompt:
            self.cos_history[p.token] = p.cosines
            self.mark("history")
        self.mark("cells")

    def on_shadow_moved(self, msg: M.ShadowMoved) -> None:
        self.shadow_progress = msg.event
        self.mark("speed")

    def shadow_line(self) -> str | None:
        """The speed panel's shadow line: its own rate and how far behind the backend it is."""
        sp = self.shadow_progress
        if self.loaded is None or self.loaded.shadow == "off":
            return None
        backend = max(sp.backend if sp else 0, self.kv[0] if self.kv else 0)
        behind = max(0, backend - (sp.position if sp else 0))
        rate = f"{sp.tok_s:.1f} tok/s" if sp and sp.tok_s else "- tok/s"
        where = (f"{behind} behind" if self.query_one(SpeedPanel).compact else f"{behind} positions behind") \
            if behind else "caught up"
        return f"shadow {rate} · {where}"

    def on_generation_done(self, msg: M.GenerationDone) -> None:
        r = self.result = msg.event.result
        self.generating = False
        if r.get("prefill_tok_s"):
            self.prefill = r["prefill_tok_s"]
        if r.get("time_to_first_token_s"):
            self.ttft = r["time_to_first_token_s"]
        if r.get("decode_tok_s"):
            self.decode = r["decode_tok_s"]
        note = f"done: {self.n_generated} tokens, stop={r.get('stop_reason', '?')}"
        if r.get("reused"):
            note += f"; prefilled {r.get('prefilled')} new tokens, {r['reused']} reused from the KV cache"
        if self.gen_chat:
            self.transcript = self.shown_prompt + "".join(self.output).strip() + "\n\n"
        if r.get("fallback"):
            note += f"; {r['fallback']}"
        if r.get("stop_reason") == "error" and self.failures:
            note += f"; {self.failures[-1][1]}"
        self.note = note
        self.mark("output", "speed")

    def on_engine_failed(self, msg: M.EngineFailed) -> None:
        ev = msg.event
        self._failed(ev.where, ev.reason, ev.fallback)
        if ev.where == "generate" and self.loaded is not None and self.engine.info is not None:
            self.query_one(ModelPanel).show(self.engine.info, self.loaded.shadow)
        if ev.where == "shadow":
            cells = self.query_one(LayerCells)
            cells.setup(cells.n_layer, f"shadow failed: {ev.reason} (per-layer parity off)", True)

    def _failed(self, where: str, reason: str, fallback: str | None) -> None:
        self.failures.append((where, reason, fallback))
        text = f"{where} failed: {reason}" + (f"; {fallback}" if fallback else "")
        self.note = text
        self.notify(text, severity="error", timeout=8)

    def on_gate_result(self, msg: M.GateResult) -> None:
        self.query_one(GatesPanel).show(msg.event)

    @on(M.L1Measured)
    def show_l1(self, msg: M.L1Measured) -> None:
        self.query_one(L1Gauge).show(msg.event)

    def on_bisect_done(self, msg: M.BisectDone) -> None:
        self.last_bisect = msg.event
        self.note = msg.event.summary
        self.notify(msg.event.summary, title="bisect", timeout=10,
                    severity="warning" if msg.event.stage else "information")

    def on_prompt_area_submitted(self, msg: PromptArea.Submitted) -> None:
        self.action_generate()

    def on_unmount(self) -> None:
        gc.unfreeze()
        self.engine.close()


from tui.cli import build_parser, main  # noqa: E402, F401 - the command line (imports this module lazily)

if __name__ == "__main__":
    sys.exit(main())
