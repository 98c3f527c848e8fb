"""The prefill BLAS path: several matrices and chunks in one parallel region, and one BLAS thread."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

from apr_numba.kernels.matmul import BLAS_CHUNK_GROUPS, BLAS_MIN_T, matmul_auto, packed_tuple
from apr_numba.quants.layouts import decode_codes
from apr_numba.quants.repack import pack
from tests.test_quants import product_bound, random_tensor


def test_blas3_many_chunks_against_float64():
    """Three matrices of different types and row counts (partial groups, several chunks each) through the
    T >= BLAS_MIN_T path match the float64 product of gguf-py's dequantized weights within the float32 bound."""
    cols = 256
    specs = [(T.Q4_K, 64 * BLAS_CHUNK_GROUPS * 2 + 37), (T.Q8_0, 70), (T.Q6_K, 64 * BLAS_CHUNK_GROUPS + 1)]
    Ws, tuples = [], []
    for i, (qt, rows) in enumerate(specs):
        raw = random_tensor(qt, rows, cols, seed=30 + i)
        Ws.append(quants.dequantize(raw, qt).reshape(rows, cols).astype(np.float64))
        tuples.append(packed_tuple(pack(decode_codes(qt, raw, (rows, cols)))))
    X = np.random.default_rng(3).standard_normal((BLAS_MIN_T + 5, cols)).astype(np.float32)
    out = np.full((X.shape[0], sum(r for _, r in specs)), np.nan, np.float32)
    matmul_auto(out, X, tuples[0], tuples[1], tuples[2], 3)
    W = np.concatenate(Ws)
    err = np.abs(out - X.astype(np.float64) @ W.T)
    assert np.all(err <= product_bound(X.astype(np.float64), W))


def test_limit_blas_threads_holds_numpy_and_scipy_pools():
    """After configure_threading, every OpenBLAS pool threadpoolctl finds (NumPy's, and scipy's that Numba's
    np.dot calls, loaded afterwards) runs one thread; APR_NUMBA_BLAS_THREADS overrides."""
    code = ("import json, numpy; from apr_numba import runtime; runtime.configure_threading(); "
            "import scipy.linalg.cython_blas; from threadpoolctl import threadpool_info; "
            "print(json.dumps(sorted((i['filepath'].rsplit('/', 1)[-1], i['num_threads']) for i in threadpool_info() "
            "if i['user_api'] == 'blas')))")
    two = min(2, os.cpu_count() or 1)
    for env_n, start_n, want in ((None, None, 1), ("2", "1", two)):  # the override must raise a pool started at 1
        env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "APR_NUMBA_BLAS_THREADS")}
        if env_n:
            env["APR_NUMBA_BLAS_THREADS"] = env_n
            env["OPENBLAS_NUM_THREADS"] = start_n
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        pools = json.loads(out.stdout.strip().splitlines()[-1])
        assert len(pools) >= 2 and any("scipy" in p and "openblas" in p for p, _ in pools)
        assert {n for _, n in pools} == {want}, pools
