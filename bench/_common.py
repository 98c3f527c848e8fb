"""Helpers shared by the bench scripts: the CPU model, a busy competitor process, peak RSS of a command."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

BUSY = "while 1: pass"


def cpu_model() -> str:
    """``model name`` from /proc/cpuinfo, with the core count Python sees (e.g. 'AMD EPYC, 2 cores')."""
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def load_average() -> str:
    """The 1/5/15-minute load averages as a string (other work on a shared machine moves the numbers)."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


@contextlib.contextmanager
def busy_processes(n: int):
    """Run ``n`` CPU-bound ``while 1: pass`` processes for the duration of the block (0: none)."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()
