"""apr-numba warmup: compile progress from Numba's compile events, and the kernels the forward reaches."""

from __future__ import annotations

import io
import json
import re

import numba
from numba import njit

from apr_numba.cli.warmup_cmd import COUNT_FILE, compile_progress, reachable_kernels


def test_reachable_kernels_cover_the_forward():
    """The static walk finds the forward and the kernels its source calls (module + qualname of the Python function)."""
    names = set(reachable_kernels())
    for want in ("apr_numba.backends.cpu_forward.forward", "apr_numba.kernels.matmul.matmul_auto",
                 "apr_numba.kernels.matmul._matmul3", "apr_numba.kernels.matmul_blas.matmul_blas3",
                 "apr_numba.kernels.attention.attention", "apr_numba.kernels.norm.rmsnorm",
                 "apr_numba.kernels.embed.embed_tokens", "apr_numba.backends.cpu_decode.forward_workers",
                 "apr_numba.kernels.matmul.product_task", "apr_numba.kernels.sync.wait_done"):
        assert want in names, want


def test_compile_progress_counts_draws_and_records(tmp_path, monkeypatch):
    """Two fresh functions compiled inside the block: n == 2, the bar says 'kernel 2 of 2' and names the
    kernel, and the count is recorded for the next cold start's N; a cached call inside a block counts 0."""
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "hash"), raising=False)

    @njit(cache=False)
    def inner_kernel(x):
        return x + 1

    @njit(cache=False)
    def outer_kernel(x):
        return inner_kernel(x) * 2

    buf = io.StringIO()
    with compile_progress(enabled=True, stream=buf, key="unit") as prog:
        assert outer_kernel(1) == 4
    assert prog.n == 2
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())  # drop the terminal control sequences
    assert "[apr-numba] first run: compiling kernel 2/2" in out and "inner_kernel" in out, out
    assert json.loads((tmp_path / COUNT_FILE).read_text())["unit"] == 2
    buf2 = io.StringIO()
    with compile_progress(enabled=True, stream=buf2, key="unit") as prog2:
        assert outer_kernel(2) == 6
    assert prog2.n == 0 and buf2.getvalue() == ""
