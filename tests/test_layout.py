"""The package layout (issue 12): no import cycles between apr_numba's modules (module-level or inside
functions), no module named after a standard-library module, and no decoder math under tui/."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "apr_numba"
TUI = PKG.parent / "tui"


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.parts[-1] == "__init__" else rel.parts
        out[".".join(parts)] = f
    return out


def _graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    g = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                subs = [f"{node.module}.{a.name}" for a in node.names]
                names = [s for s in subs if s in mods] or [node.module]
            g[m].update(n for n in names if n in mods and n != m)
    return g


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    mods = _modules()
    assert len(mods) > 40
    assert _cycles(_graph(mods)) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_shadows_the_standard_library():
    clash = [m for m in _modules() if m.rsplit(".", 1)[-1] in sys.stdlib_module_names]
    assert clash == []


MATH = ("rms_norm", "rmsnorm", "rope", "causal_attention", "softmax", "silu", "swiglu", "gelu_tanh", "moe_ffn")


def test_tui_holds_no_decoder_math():
    """The dashboard's shadow is the reference backend: tui/ neither defines nor imports the block's operations."""
    bad = []
    for f in TUI.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name in MATH:
                bad.append(f"{f.name}: def {node.name}")
            if isinstance(node, ast.ImportFrom) and any(a.name in MATH for a in node.names):
                bad.append(f"{f.name}: imports {[a.name for a in node.names if a.name in MATH]}")
    assert bad == []
