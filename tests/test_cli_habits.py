"""CLI habits of llama.cpp users: a positional prompt with the model omitted, -f/--file, stdin, -c/--ctx-size,
--min-p, --version, help text with defaults, and --json --stream as JSON lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import apr_numba
from apr_numba.cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent
SMOLLM = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
needs_model = pytest.mark.skipif(not SMOLLM.is_file(), reason=f"needs {SMOLLM.name}")


def cli(*args, stdin: str | None = None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    kw = {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
    return subprocess.run([sys.executable, "-m", "apr_numba", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, **kw)


def test_version():
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"apr-numba {apr_numba.__version__}"


def test_every_run_option_has_help_with_default():
    run = build_parser()._subparsers._group_actions[0].choices["run"]
    for act in run._actions:
        if act.option_strings and act.dest != "help":
            assert act.help, act.option_strings
    text = run.format_help()
    for opt in ("--top-k", "--top-p", "--min-p", "--repeat-penalty", "-c N_CTX, --ctx-size N_CTX",
                "-f FILE, --file FILE"):
        assert opt in text, opt
    assert "(default: 1.0)" in text and "(default: 128)" in text


def test_bad_prompt_file_is_one_line_error():
    r = cli("run", "smollm2-135m", "-f", "/nonexistent/prompt.txt")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "/nonexistent/prompt.txt" in r.stderr


@needs_model
def test_positional_prompt_stdin_file_and_json_stream(tmp_path):
    from apr_numba.generation.generate import generate

    expect = generate(str(SMOLLM), "The capital of France is", max_tokens=6)
    r = cli("run", "The capital of France is", "-n", "6", "-c", "256", "--cpu")  # the default model
    assert r.returncode == 0, r.stderr
    assert r.stdout == expect + "\n"
    r = cli("run", "smollm2-135m", "-n", "6", "--ctx-size", "256", "--cpu", "--json", "--stream",
            stdin="The capital of France is")  # the prompt piped on stdin
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert "".join(x["text"] for x in lines[:-1]) == expect
    assert [x["index"] for x in lines[:-1]] == list(range(len(lines) - 1))
    assert lines[-1]["done"] and lines[-1]["text"] == expect
    f = tmp_path / "p.txt"
    f.write_text("The capital of France is")
    r = cli("run", "smollm2-135m", "-f", str(f), "-n", "6", "-c", "256", "--cpu", "--min-p", "0.05", "--json")
    assert json.loads(r.stdout)["text"] == expect  # greedy: min-p keeps the arg-max
