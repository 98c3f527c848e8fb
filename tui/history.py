"""The cosine history panel: over the generated tokens, the minimum per-layer cosine (one coloured bar per token,
taller = further from 1) and a layer x token heat-map (rows: groups of layers, each cell the group's minimum),
drawn with Rich cells in the colours of the per-layer panel (:data:`tui.widgets.COS_SCALE`)."""

from __future__ import annotations

import math

from rich.text import Text
from textual.widget import Widget

from tui.widgets import COS_SCALE

BARS = "▁▂▃▄▅▆▇█"
LABEL = 6  # "  min│", "10-14│"


def cos_style(c: float | None) -> str:
    """The Rich style of a cosine's cell (COS_SCALE colour on the terminal background)."""
    if c is None:
        return "dim"
    if math.isnan(c):
        return "magenta"
    d = 1.0 - c
    for lo, bg, _, _ in COS_SCALE:
        if d < lo:
            return bg
    return COS_SCALE[-1][1]


def cos_bar(c: float | None) -> str:
    """A bar that grows with 1 - cos on a log scale: 1e-14 or less is the lowest bar, 1e-1 or more the top."""
    if c is None:
        return "·"
    d = 1.0 - c
    if not d > 1e-14:  # also NaN: drawn in magenta at full height below
        return BARS[-1] if math.isnan(c) else BARS[0]
    level = (math.log10(d) + 14) / 13  # 1e-14 -> 0, 1e-1 -> 1
    return BARS[max(0, min(len(BARS) - 1, int(level * len(BARS))))]


class HistoryPanel(Widget):
    """Min per-layer cosine per generated token, and a layer-group x token heat-map (not in compact mode)."""

    MAX_ROWS = 5

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.history: dict[int, list[float]] = {}
        self.n_tokens = 0

    def set_compact(self, compact: bool) -> None:
        self.set_class(compact, "compact")
        self.refresh(layout=True)

    def show(self, history: dict[int, list[float]], n_tokens: int) -> None:
        """``history``: generated token index -> cosine per layer; ``n_tokens``: tokens generated so far."""
        self.history, self.n_tokens = history, n_tokens
        self.refresh(layout=True)

    def _groups(self) -> list[tuple[int, int]]:
        n_layer = max((len(v) for v in self.history.values()), default=0)
        if not n_layer or self.has_class("compact"):
            return []
        size = math.ceil(n_layer / self.MAX_ROWS)
        return [(lo, min(lo + size, n_layer)) for lo in range(0, n_layer, size)]

    def get_content_height(self, container, viewport, width: int) -> int:
        return 1 if self.has_class("compact") else 2 + len(self._groups())

    def render(self) -> Text:
        t = Text(no_wrap=True, overflow="crop")
        width = max(1, self.content_size.width - LABEL)
        first = max(0, self.n_tokens - width)
        idx = range(first, self.n_tokens)
        mins = {i: min(v) for i, v in self.history.items() if v}
        t.append("   min│", style="dim")
        for i in idx:
            c = mins.get(i)
            t.append(cos_bar(c), style=cos_style(c))
        for lo, hi in self._groups():
            t.append(f"\n{lo:>2}-{hi - 1:<2}│", style="dim")
            for i in idx:
                v = self.history.get(i)
                c = min(v[lo:hi]) if v else None
                t.append("█" if c is not None else "·", style=cos_style(c))
        if self.has_class("compact"):
            return t
        t.append("\n")
        if mins:
            worst = min(mins, key=mins.get)
            layer = self.history[worst].index(mins[worst])
            t.append(f"{len(mins)}/{self.n_tokens} tokens compared; worst: token {worst}, layer {layer}, "
                     f"1 − cos = {1 - mins[worst]:.1e}", style="italic")
        else:
            t.append("no token compared yet (the shadow runs when idle)" if self.n_tokens else
                     "no generation yet", style="italic")
        return t
