"""The dashboard's gates in their own process, one gate per request. Nothing here imports textual.

The gates load what they measure on (:class:`apr_numba.gates.context.GateContext`: their own CPU load of the
model, the MiniLM encoder, an OpenCL backend of the model): for qwen2.5-coder-0.5b that is about 3 GB beside
the dashboard's own 1 GB. In a child process that memory is not the dashboard's and is handed back to the OS
when the run ends, and the gates' timings are not disturbed by the UI thread's GIL.

Protocol (``python -m tui.gate_process MODEL [--threads N]``): one gate id per line on stdin; for each, one
JSON line on stdout: :meth:`apr_numba.gates.core.GateResult.to_dict` (or ``{"id", "status": "FAIL",
"reason"}`` for an unknown id). Whatever the gates print goes to stderr (kept in a file, quoted when the
child dies). EOF on stdin ends the process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


class GateProcessError(RuntimeError):
    """The gate process died or answered something that is not a gate result (message has its stderr tail)."""


def _pythonpath() -> str:
    """PYTHONPATH that finds this ``tui`` and the ``apr_numba`` it runs beside, then the caller's."""
    import apr_numba

    dirs = [str(Path(__file__).resolve().parents[1]), str(Path(apr_numba.__file__).resolve().parents[1])]
    rest = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join(dict.fromkeys(dirs + ([rest] if rest else [])))


class GateProcess:
    """A running gate child: :meth:`measure` one gate id at a time, :meth:`close` to end it.

    Args:
        model: the model file the gates measure (the dashboard's own path).
        threads: kernel threads for the gates (None: all cores, as ``apr-numba gates``).
    """

    def __init__(self, model: str | os.PathLike, threads: int | None = None) -> None:
        cmd = [sys.executable, "-m", "tui.gate_process", str(model)]
        if threads:
            cmd += ["--threads", str(threads)]
        self._err = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
        env = dict(os.environ, PYTHONPATH=_pythonpath())
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True,
                                     env=env, bufsize=1)

    def measure(self, gate_id: str) -> dict:
        """Measure gate ``gate_id`` in the child; returns its GateResult as a dict.

        Raises:
            GateProcessError: the child died (its stderr tail in the message) or answered garbage.
        """
        p = self.proc
        try:
            p.stdin.write(gate_id + "\n")
            p.stdin.flush()
            line = p.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            p.wait()
            raise GateProcessError(f"gate process exited with status {p.returncode} while measuring {gate_id}: "
                                   f"{self.stderr_tail()}")
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            raise GateProcessError(f"gate process answered {line[:200]!r} for {gate_id}") from None

    def stderr_tail(self, n: int = 600) -> str:
        self._err.seek(0)
        return " ".join(self._err.read()[-n:].split())

    def close(self) -> None:
        """End the child (EOF on its stdin; killed if it does not exit within 5 s). Idempotent."""
        p = self.proc
        if p.poll() is None:
            try:
                p.stdin.close()
                p.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                p.kill()
                p.wait()
        self._err.close()


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tui.gate_process", description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the gates print goes to stderr: stdout carries only the protocol
    sys.stdout = sys.stderr
    from apr_numba.gates import registry
    from apr_numba.gates.context import GateContext
    from apr_numba.gates.core import run_gate

    ctx = GateContext(a.model, threads=a.threads)
    specs = {s.id: s for s in registry()}
    for line in sys.stdin:
        gid = line.strip()
        if not gid:
            continue
        spec = specs.get(gid)
        res = run_gate(spec, ctx).to_dict() if spec is not None else \
            {"id": gid, "status": "FAIL", "value": None, "reason": f"unknown gate id {gid!r}"}
        out.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
