"""The real dashboard in a real terminal, as a user lives it: scripts/tmux_smoke.sh drives ``apr-tui`` under tmux
(send-keys one character at a time, capture-pane). No -p: the user types the prompt and presses Enter; the screen
must show generated text, the engine's tok/s, per-layer cosines and gate ids, and Escape, q must quit. A second
run holds a two-turn chat whose second answer uses the first. CI installs tmux (``apt-get install -y tmux``);
without it these tests fail rather than skip."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "tmux_smoke.sh"


def smoke(tmp_path: Path, **env) -> str:
    assert shutil.which("tmux"), "tmux is required for this test: apt-get install -y tmux"
    # this checkout's tui and apr_numba (the console script may point at another editable checkout)
    apr_tui = f"env PYTHONPATH={ROOT} {sys.executable} -m tui.app"
    full = dict(os.environ, APR_TUI=apr_tui, TIMEOUT_S="400", **env)
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], env=full, capture_output=True, text=True,
                          timeout=1500)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return (tmp_path / "screen-final.txt").read_text()


@pytest.mark.slow
def test_dashboard_under_tmux(tmp_path):
    screen = smoke(tmp_path)
    left = "\n".join(line.split("││")[0].split("│╭")[0].split("│╰")[0] for line in screen.splitlines())
    generated = left.rsplit("Write two sentences about lighthouses.", 1)[1].split("tokens, stop=")[0]  # output
    assert re.search(r"lighthouse|beacon|ship|coast|sea", generated, re.I), generated  # text about the prompt
    assert re.search(r"decode \d+\.\d tok/s", screen) and re.search(r"shadow (\d+\.\d|-) tok/s", screen)
    assert re.search(r"position \d+ \(token \d+", screen) and "0│1-" in screen
    assert re.search(r"[A-Z]+-\d{3} +(PASS|FAIL|N/A)", screen)


@pytest.mark.slow
def test_two_turn_chat_under_tmux(tmp_path):
    """qwen2.5-coder-0.5b-instruct, greedy: "My name is Ada." then "What is my name?" typed as a user would; turn
    two prefilled only its new tokens (the rest came from the KV cache of turn one) and its answer uses the
    first: it names Ada (the same ids and positions as the API: tests/test_tui_engine.py)."""
    screen = smoke(tmp_path, CHAT="1")
    m = re.search(r"prefilled (\d+) new tokens, (\d+) reused", screen)
    assert m, screen
    new, reused = int(m[1]), int(m[2])
    assert reused > new > 0  # turn one's tokens (system, user, reply) are reused; only the new turn is run
    answer = screen.split("What is my name?", 1)[1]
    assert re.search(r"model:.*\bAda\b", answer, re.S), answer
