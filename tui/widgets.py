"""The dashboard's panels. Each shows what the engine measured and nothing else; styling is in app.tcss."""

from __future__ import annotations

import math
from pathlib import Path

from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import DataTable, Sparkline, Static, TextArea

from tui.events import GateRow, L1Reading, ModelInfo, Parity, gates_summary

# 1 - cosine -> cell colour, best first: float32 rounding level, 1e-6, bisect's 0.999, the parity gate's 0.99
COS_SCALE = ((1e-9, "#1b5e20", "white", "≥1-1e-9"), (1e-6, "#2e7d32", "white", "≥1-1e-6"),
             (1e-3, "#9e9d24", "black", "≥0.999"), (1e-2, "#ef6c00", "black", "≥0.99"),
             (math.inf, "#c62828", "white", "<0.99"))
CELL = 8  # "1-2e-13" + a space
CELL_COMPACT = 6  # "2e-13" (1 - cos) + a space


def display_name(name: str, path: str) -> str:
    """The model's name for titles: GGUF ``general.name`` when it names the file's model, else the file stem.

    ``general.name`` is often a training run id ("Smollm2 135M 8k Lc100K Mix1 Ep2" in SmolLM2-135M-Instruct's
    file); it is kept only when its letters and digits appear, in order, in the file name's.
    """
    stem = Path(path).name
    for suffix in (".gguf", ".apr"):
        stem = stem.removesuffix(suffix)
    key = "".join(ch for ch in (name or "").lower() if ch.isalnum())
    it = iter("".join(ch for ch in stem.lower() if ch.isalnum()))
    return name if key and all(ch in it for ch in key) else stem


def cos_cell(c: float | None, compact: bool = False) -> tuple[str, str]:
    """A cosine as text and its Rich style: "1-2e-13" (= 1 - 2e-13) near 1, else 5 decimals; ``compact``
    shows 1 - cos only ("2e-13", 5 characters)."""
    w = 5 if compact else 7
    if c is None:
        return "·".center(w), "dim"
    if math.isnan(c):
        return "nan".center(w), "bold white on magenta"
    d = 1.0 - c
    if d <= 0.0:
        txt = "0" if compact else "1"
    elif d < 1e-5 or compact and d < 1:
        e = f"{d:.0e}".replace("e-0", "e-")
        txt = e if compact else f"1-{e}"
    elif compact:
        txt = f"{d:.1f}"
    else:
        txt = f"{c:.5f}" if c >= 0 else f"{c:.4f}"
    for lo, bg, fg, _ in COS_SCALE:
        if d < lo:
            return txt.center(w), f"{fg} on {bg}"
    return txt.center(w), "white on #c62828"


class PromptArea(TextArea):
    """Multi-line prompt: Enter submits, ctrl+j (or shift/alt+Enter) adds a line, up/down on the first/last
    line walk the history."""

    class Submitted(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    NEWLINE_KEYS = ("ctrl+j", "shift+enter", "alt+enter")

    def __init__(self, **kwargs) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, highlight_cursor_line=False, **kwargs)
        self.cursor_blink = False  # steady cursor: stable screenshots, no timer redraws
        self.prompts: list[str] = []
        self._hist_pos: int | None = None
        self._draft = ""

    async def _on_key(self, event: events.Key) -> None:
        key = event.key
        if key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self.text))
            return
        if key in self.NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        if key == "up" and self.cursor_location[0] == 0 and self.prompts:
            event.stop()
            event.prevent_default()
            self._walk(-1)
            return
        if key == "down" and self.cursor_location[0] == self.document.line_count - 1 and self._hist_pos is not None:
            event.stop()
            event.prevent_default()
            self._walk(+1)
            return
        await super()._on_key(event)

    def _walk(self, step: int) -> None:
        if self._hist_pos is None:
            self._draft, self._hist_pos = self.text, len(self.prompts)
        pos = max(0, min(len(self.prompts), self._hist_pos + step))
        self._hist_pos = pos
        self.load_text(self.prompts[pos] if pos < len(self.prompts) else self._draft)
        if pos == len(self.prompts):
            self._hist_pos = None
        self.move_cursor(self.document.end)

    def remember(self, text: str) -> None:
        """Add a submitted prompt to the history (no repeats of the last one)."""
        if text and (not self.prompts or self.prompts[-1] != text):
            self.prompts.append(text)
        self._hist_pos = None


class OutputView(VerticalScroll):
    """The prompt (dim) and the streamed output."""

    can_focus = True

    def compose(self) -> ComposeResult:
        yield Static(id="output-text")

    def show(self, prompt: str, output: str, generating: bool, note: str = "") -> None:
        t = Text()
        if prompt:
            t.append(prompt, style="dim")
        t.append(output, style="bold")
        if generating:
            t.append("▌", style="reverse")
        if note:
            t.append(f"\n[{note}]", style="italic yellow")
        self.query_one("#output-text", Static).update(t)
        self.scroll_end(animate=False)


class LayerCells(Widget):
    """One cell per layer, coloured by the cosine of the backend's block output against the shadow's."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n_layer = 0
        self.label = "loading ..."
        self.where = ""
        self.parity: Parity | None = None
        self.off = False

    def setup(self, n_layer: int, label: str, off: bool) -> None:
        self.n_layer, self.label, self.off = n_layer, label, off
        self.where = ""
        self.border_title = "per-layer cosine (post_ffn_residual)"
        self.refresh(layout=True)

    def show(self, parity: Parity, token_text: str | None, label: str) -> None:
        self.parity, self.label = parity, label
        tok = "prompt" if parity.token is None else f"token {parity.token}"
        if token_text is not None:
            tok += f" {token_text!r}"
        lag = f", shadow {parity.lag} behind" if parity.lag else ""
        self.where = f"position {parity.position} ({tok}){lag}"
        self.refresh(layout=True)

    @property
    def compact(self) -> bool:
        return self.has_class("compact")

    def _per_row(self, width: int | None = None) -> int:
        width = self.content_size.width if width is None else width
        return max(1, (width - 4) // (CELL_COMPACT if self.compact else CELL))

    def get_content_height(self, container, viewport, width: int) -> int:
        if self.off or not self.n_layer:
            return 2
        return 2 + math.ceil(self.n_layer / self._per_row(width)) + (1 if self.has_class("legend") else 0)

    def render(self) -> Text:
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append(self.label + "\n", style="bold")
        if self.off or not self.n_layer:
            return t
        t.append(self.where or "waiting for the first token", style="italic")
        t.append("  (cells: 1 − cos)\n" if self.compact else "\n", style="dim")
        per = self._per_row()
        cos = self.parity.cosines if self.parity is not None else [None] * self.n_layer
        for r0 in range(0, self.n_layer, per):
            t.append(f"{r0:>3}│", style="dim")
            for il in range(r0, min(r0 + per, self.n_layer)):
                txt, style = cos_cell(cos[il] if il < len(cos) else None, self.compact)
                t.append(txt, style=style)
                t.append(" ")
            t.append("\n")
        if self.has_class("legend"):
            t.append("cos: 1-2e-13 = 1 − 2·10⁻¹³ ", style="dim")
            for _, bg, fg, name in COS_SCALE:
                t.append(f" {name} ", style=f"{fg} on {bg}")
        t.rstrip()
        return t

    def on_click(self, event: events.Click) -> None:
        at = event.get_content_offset(self)
        if self.parity is None or at is None or at.y < 2:
            return
        per = self._per_row()
        col = (at.x - 4) // (CELL_COMPACT if self.compact else CELL)
        il = (at.y - 2) * per + col
        if at.x >= 4 and 0 <= col < per and 0 <= il < min(self.n_layer, len(self.parity.cosines)):
            c = self.parity.cosines[il]
            self.app.notify(f"layer {il}, {self.where}: cosine {c:.15f} (1 - cos = {1 - c:.3e})", timeout=4)


class SpeedPanel(Vertical):
    """The engine's decode tok/s (and its sparkline over the last tokens), prefill tok/s, time to first token,
    tokens generated, KV fill, and on its own line the trailing shadow's rate and lag."""

    compact = False

    def compose(self) -> ComposeResult:
        yield Static("no generation yet", id="speed-text")
        yield Sparkline([], id="speed-spark", summary_function=max)

    def set_compact(self, compact: bool) -> None:
        self.compact = compact
        if getattr(self, "_last", None) is not None:
            self.show(*self._last)

    def show(self, rates: list[float], prefill: float | None, ttft: float | None, n_tokens: int,
             decode: float | None, kv: tuple[int, int] | None, shadow: str | None = None) -> None:
        self._last = (rates, prefill, ttft, n_tokens, decode, kv, shadow)

        def num(v, fmt):
            return (fmt.format(v), "bold") if v is not None else ("-", "dim")

        t = Text()
        t.append("decode ")
        t.append(*num(decode, "{:.1f}"))
        t.append(" tok/s · ")
        t.append(str(n_tokens), style="bold")
        t.append(" tokens\nprefill ")
        t.append(*num(prefill, "{:.1f}"))
        t.append(" tok/s · TTFT ")
        t.append(*num(None if ttft is None else ttft * 1000, "{:.0f}"))
        t.append(" ms")
        if kv is not None and not self.compact:
            t.append(f"\nKV cache {kv[0]}/{kv[1]} positions")
        if shadow:
            t.append("\n" + shadow, style="italic")
        self.query_one("#speed-text", Static).update(t)
        self.query_one("#speed-spark", Sparkline).data = rates[-60:]


class L1Gauge(Static):
    """The gate's L1-miss proxy for the running kernels, with the 5 % line (WS-002)."""

    compact = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.reading: L1Reading | None = None
        self.note = "waiting for a measurement"

    def set_compact(self, compact: bool) -> None:
        self.compact = compact
        self.refresh(layout=True)

    def show(self, reading: L1Reading | None, note: str | None = None) -> None:
        self.reading = reading
        if reading is not None and reading.value is None:
            self.note = reading.detail
        if note is not None:
            self.note = note
        self.refresh(layout=True)

    def render(self) -> Text:
        t = Text()
        r = self.reading
        if r is None or r.value is None:
            t.append(self.note, style="italic")
            return t
        ok = r.value < r.threshold
        value = Text(f"{r.value * 100:.1f} %", style="bold green" if ok else "bold red")
        width = max(10, self.content_size.width - (len(value) + 1 if self.compact else 0))
        full = max(0.10, 2 * r.threshold, r.value * 1.2)  # the bar spans 0..full
        fill = min(width, round(width * r.value / full))
        mark = min(width - 1, round(width * r.threshold / full))
        for i in range(width):
            ch = "│" if i == mark else ("█" if i < fill else "░")
            style = "bold white" if i == mark else ("green" if ok else "red") if i < fill else "grey35"
            t.append(ch, style=style)
        t.append(" " if self.compact else "\n")
        t.append_text(value)
        if not self.compact:
            t.append(f"  (│ = {r.threshold * 100:.0f} %) {r.source}")
            if r.detail:
                t.append(f"; {r.detail}", style="dim")
        return t


SHORT_UNITS = {"fraction": "%", "relative": "rel", "count": "", "abs": "", "cosine": "", "ratio": "x",
               "uploads/token": "/tok", "tokens": "tok", "ms": "ms"}


def fmt_measure(value, unit: str) -> str:
    """A gate value with a short unit, 3 significant digits; fractions as percent."""
    if value is None:
        return "-"
    v = float(value) * (100 if unit == "fraction" else 1)
    u = SHORT_UNITS.get(unit, unit)
    return f"{v:.3g} {u}".strip() if u != "%" else f"{v:.3g}%"


def fmt_threshold(row: GateRow) -> str:
    """The threshold without the unit (the value column has it), except percent."""
    def num(v):
        return f"{v * 100:.3g}%" if row.unit == "fraction" else f"{v:.3g}"

    if row.threshold is None:
        return "-"
    if row.comparison == "between":
        lo, hi = row.threshold
        return f"[{num(lo)}, {num(hi)}]"
    return f"{row.comparison}{num(row.threshold)}"


class GatesPanel(Vertical):
    """Gate id, PASS / FAIL / N/A (NOT_APPLICABLE), measured value vs threshold, as results arrive; the
    selected row's detail below the table. Compact: no threshold column."""

    STATUS = {"PASS": ("PASS", "bold green"), "FAIL": ("FAIL", "bold red"), "NOT_APPLICABLE": ("N/A", "dim")}
    compact = False

    def compose(self) -> ComposeResult:
        yield Static("", id="gates-note")
        yield DataTable(id="gates-table", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        self.rows: dict[str, GateRow] = {}
        self._columns()

    def _columns(self) -> tuple[str, ...]:
        cols = ("gate", "", "value") + (() if self.compact else ("limit",))
        table = self.query_one(DataTable)
        if tuple(str(c.label) for c in table.columns.values()) != cols:
            table.clear(columns=True)
            for col in cols:
                table.add_column(col, key=col)
            for row in self.rows.values():
                self._put(row)
        return cols

    def set_compact(self, compact: bool) -> None:
        self.compact = compact
        self._columns()

    def note(self, text: str) -> None:
        w = self.query_one("#gates-note", Static)
        w.update(Text(text, style="italic"))
        w.display = bool(text)

    def show(self, row: GateRow) -> None:
        """Add or update a gate's row; failing gates sort first, and the note above the table sums them up."""
        self.rows[row.id] = row
        self._put(row)
        self.query_one(DataTable).sort("gate", key=lambda gid: (self.ORDER.get(self.rows[str(gid)].status, 1),
                                                               str(gid)))
        self.note(gates_summary(list(self.rows.values())))

    ORDER = {"FAIL": 0, "PASS": 2, "NOT_APPLICABLE": 3}

    def _put(self, row: GateRow) -> None:
        table = self.query_one(DataTable)
        label, style = self.STATUS.get(row.status, (row.status, "bold yellow"))
        cells = [row.id, Text(label, style=style), fmt_measure(row.value, row.unit)]
        if not self.compact:
            cells.append(fmt_threshold(row))
        if row.id in table.rows:
            for col, val in zip(table.columns, cells, strict=True):
                table.update_cell(row.id, col, val)
        else:
            table.add_row(*cells, key=row.id)


    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        row = self.rows.get(str(event.row_key.value))
        if row is not None:
            self.app.notify(f"{row.id} {row.status}: {row.detail or 'no detail'}", timeout=8)


class ModelPanel(Static):
    """Architecture, layers, quant mix, size, backend, device, threads, threading layer, parity-gate line."""

    compact = False
    info: ModelInfo | None = None

    def set_compact(self, compact: bool) -> None:
        self.compact = compact
        if self.info is not None:
            self.show(self.info, self.shadow)

    def show(self, info: ModelInfo, shadow: str) -> None:
        self.info, self.shadow = info, shadow
        mix = ", ".join(f"{k} x{v}" for k, v in sorted(info.quant_mix.items(), key=lambda kv: -kv[1]))
        t = Text()
        if self.compact:
            t.append(f"{info.arch} {info.n_layer}L d{info.n_embd} · {info.file_bytes / 2**20:.0f} MiB\n")
            t.append(f"{mix}\n")
            t.append(info.backend, style="bold")
            t.append(f" · {info.threads} threads ({info.threading_layer})")
        else:
            t.append(info.name + "\n", style="bold")
            t.append(f"{info.arch}, {info.n_layer} layers, d={info.n_embd}, heads {info.n_head}/{info.n_head_kv}\n")
            t.append(f"quant {mix}\n")
            t.append(f"{info.file_bytes / 2**20:.1f} MiB file, {info.packed_bytes / 2**20:.1f} MiB packed\n")
            dev = info.device if info.device.startswith(info.backend) else f"{info.backend} on {info.device}"
            t.append(f"backend {dev}\n")
            t.append(f"threads {info.threads} ({info.threading_layer}), KV ctx {info.n_ctx}")
        if info.parity_line:
            style = "green" if info.parity_line.startswith("parity gate passed") else "bold yellow"
            t.append("\n" + info.parity_line, style=style)
        self.update(t)


class HelpScreen(ModalScreen):
    """The keys."""

    BINDINGS = [("escape,q,question_mark", "app.pop_screen", "Close")]
    TEXT = """[b]apr-tui keys[/b]  (the prompt box types every printable key: Esc leaves it)

Enter        send the prompt (in the box: ctrl+j adds a line, up/down: history)
Escape       stop generating (the text so far stays); in the box: leave it
i            back to the prompt box       ctrl+t / c   chat mode on/off
ctrl+n / n   new conversation (/new, or /system TEXT to set a system prompt)
ctrl+r / b   bisect the last prompt against the shadow: first divergent stage
ctrl+g / g   measure the fast gates (Enter on a gate row: its detail)
ctrl+s / s   save the session: conversation, tokens, per-token cosines (JSON)
ctrl+q / q   quit         f1 / ?  this help

Chat mode keeps the conversation (the model's chat template); each turn
prefills only its new tokens, the rest stays in the KV cache.
The shadow trails the engine and runs when it is idle; the speed panel
shows how far behind it is. Gates measure only when idle.

Cells: cosine of each block's output (post_ffn_residual) on the running
backend against the shadow for the same token; 0.999 is bisect's threshold."""

    def compose(self) -> ComposeResult:
        yield Static(self.TEXT, id="help-text")
