"""Helpers shared by the bench scripts: the CPU model, a busy competitor process, peak RSS of a command."""

from __future__ import annotations

import contextlib
import json
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


#: runs argv[1:] with inherited stdin / stderr (a terminal app keeps its terminal) and stdout captured unless
#: argv[1] is "--tty"; prints {rc, wall_s, maxrss_kb (the child's peak RSS, ru_maxrss), stdout, stderr}
WRAP = r"""
import json, resource, subprocess, sys, time
tty = sys.argv[1] == "--tty"
args = sys.argv[2:] if tty else sys.argv[1:]
t0 = time.perf_counter()
p = subprocess.run(args, capture_output=not tty, text=True)
wall = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": p.returncode, "wall_s": wall, "maxrss_kb": ru.ru_maxrss, "stdout": (p.stdout or "")[-4000:],
                  "stderr": (p.stderr or "")[-2000:]}))
"""


def run_once(args: list[str], env: dict | None = None) -> dict:
    """Run a command in a wrapper process; returns rc, wall_s, maxrss_kb (peak RSS of the command, KiB),
    stdout (its last 4000 characters), stderr (its last 2000)."""
    out = subprocess.run([sys.executable, "-c", WRAP, *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
