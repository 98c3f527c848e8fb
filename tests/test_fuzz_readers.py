"""Hypothesis fuzzing of the GGUF, safetensors, chat-template and CLI readers (issue 16), each run in a
subprocess under an address-space cap (3 GiB of ``RLIMIT_AS``: Numba and TBB reserve address space far
beyond what they touch) and checked for peak RSS under 1 GiB. Seeded (``derandomize``) and bounded; see
tests/fuzz_readers.py for the mutations. CI runs 200 GGUF + 200 safetensors + 150 template + 100 CLI cases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CASES = {"gguf": 200, "safetensors": 200, "templates": 150, "cli": 100}


@pytest.mark.parametrize("reader", sorted(CASES))
def test_fuzz_reader(reader):
    env = dict(os.environ, PYTHONPATH=str(ROOT), APR_NUMBA_CACHE=tempfile.mkdtemp(prefix="apr-fuzz-cache-"))
    p = subprocess.run([sys.executable, "-m", "tests.fuzz_readers", reader, str(CASES[reader]), str(3 << 30)],
                       capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-6000:])
    res = json.loads(p.stdout.strip().splitlines()[-1])
    print(res)
    assert res["cases"] >= CASES[reader]
    assert res["rss_mib"] < 1024, res
