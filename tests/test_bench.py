"""The bench command runs and reports what it measured (no timing thresholds: machines are noisy)."""

import json
import subprocess
import sys

import pytest

from apr_numba.cli.bench_cmd import bench_model
from apr_numba.errors import ArgumentError


def test_bench_model_reports_each_test(loaded_model):
    model = loaded_model("smollm2-135m")
    n_past = model.n_past
    res = bench_model(model, n_prompt=8, n_gen=4, reps=2)
    assert [r.test for r in res] == ["pp8", "tg4"]
    assert all(r.tok_s_mean > 0 and r.tok_s_std >= 0 and r.reps == 2 for r in res)
    assert model.n_past == n_past  # a throwaway cache: the model's own is untouched
    with pytest.raises(ArgumentError):
        bench_model(model, n_prompt=10**6, n_gen=1)


def test_bench_cli_json():
    r = subprocess.run([sys.executable, "-m", "apr_numba", "bench", "smollm2-135m", "-p", "8", "-n", "4", "-r", "1",
                        "--no-bandwidth", "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["threading_layer"] in ("tbb", "omp", "workqueue")
    assert d["weights_bytes_per_token"] > 0
    assert [x["test"] for x in d["results"]] == ["pp8", "tg4"]
