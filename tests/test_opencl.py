"""The OpenCL backend on whatever OpenCL device is present (PoCL on a CPU in CI).

1. Per-op kernels against NumPy, in the style of llama.cpp's test-backend-ops (NMSE = mse(a, b) / mse(b, 0)):
   matvec and prefill matmul for every GGML type against ``gguf.quants.dequantize``, get_rows (exact),
   RMSNorm, RoPE NORM/NEOX (against the CPU path's kernel), causal GQA attention (naive NumPy), SwiGLU,
   add, argmax.
2. Both registry models: 20 greedy tokens on OpenCL equal the CPU's ids, last-position logits cosine
   >= 0.999 (GWR-004, CPU-GPU-001/002).
3. The parity gate: a fault-injected kernel (wrong block scale) is rejected with the exact stderr line
   and the run falls back to the CPU's text (CPU-GPU-003); probe exceptions fall back too; near-tie rule.
4. ``--no-gpu``: no OpenCL/parity line on stderr and pyopencl never imported (CPU-GPU-004).
5. Transfer counters over a 32-token generation: zero weight uploads per token (GWR-003); device weight
   bytes within [model_bytes, 1.10 x model_bytes] (GWR-001).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

cl = pytest.importorskip("pyopencl")

from gguf import GGML_QUANT_SIZES  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

from apr_numba.backends import parity  # noqa: E402
from apr_numba.backends.opencl_kernels import WTYPES, Programs, find_device, list_devices  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b")
PROMPT = "The three primary colors are"
LINE = re.compile(r"^\[apr-cpu-vs-gpu-output-parity-v1\] OpenCL path rejected, attempting fallback: "
                  r"cosine vs CPU = -?\d+\.\d{6} \(< 0\.99\) at step (\d+)/(\d+)$")
pytestmark = pytest.mark.skipif(not list_devices(), reason="no OpenCL device")


def nmse(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(((a - b) ** 2).mean() / (b ** 2).mean())


def cosine(a, b) -> float:
    return parity.cosine(a, b)


# -- 1. per-op kernels ---------------------------------------------------------------------------

from tests.tiny_gguf import F16_FIELDS as HALF_FIELDS  # noqa: E402  (byte offsets of each block's f16 scales)


def random_blocks(t: T, rows: int, cols: int, rng) -> np.ndarray:
    """(rows, row_bytes) uint8 of valid random GGML data: random codes, finite small f16 scales."""
    if t == T.F32:
        return rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint8)
    if t == T.F16:
        return rng.standard_normal((rows, cols)).astype(np.float16).view(np.uint8)
    if t == T.BF16:
        f = rng.standard_normal((rows, cols)).astype(np.float32)
        return (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    bs, ts = GGML_QUANT_SIZES[t]
    b = rng.integers(0, 256, (rows * cols // bs, ts), dtype=np.uint8)
    for o in HALF_FIELDS[t]:
        d = (rng.uniform(-1.5, 1.5, b.shape[0]) * 2.0 ** -6).astype(np.float16)
        b[:, o:o + 2] = d.view(np.uint8).reshape(-1, 2)
    return b.reshape(rows, -1)


@pytest.fixture(scope="module")
def prg():
    info, dev = find_device()
    return Programs(info, dev, head_dim=64)


def buf(prg, arr=None, nbytes=None):
    mf = cl.mem_flags
    if arr is not None:
        return cl.Buffer(prg.ctx, mf.READ_WRITE | mf.COPY_HOST_PTR, hostbuf=np.ascontiguousarray(arr))
    return cl.Buffer(prg.ctx, mf.READ_WRITE, int(nbytes))


def read(prg, b, shape, dtype=np.float32):
    out = np.empty(shape, dtype)
    cl.enqueue_copy(prg.queue, out, b)
    return out


@pytest.mark.parametrize("ntok", [1, 5])
@pytest.mark.parametrize("ggml_type", sorted(WTYPES), ids=lambda t: T(t).name)
def test_matvec_vs_dequantize(prg, ggml_type, ntok):
    rng = np.random.default_rng(ggml_type * 10 + ntok)
    rows, cols, off, stride = 37, 512, 3, 45  # rows not a multiple of the work-group's rows
    raw = random_blocks(T(ggml_type), rows, cols, rng)
    W = dequantize(raw, T(ggml_type)).reshape(rows, cols).astype(np.float64)
    X = rng.standard_normal((ntok, cols)).astype(np.float32)
    y = buf(prg, np.full((ntok, stride), 7.0, np.float32))
    prg.matvec(ggml_type, buf(prg, raw), cols, rows, buf(prg, X), cols, y, stride, off, ntok)
    Y = read(prg, y, (ntok, stride))
    assert nmse(Y[:, off:off + rows], X.astype(np.float64) @ W.T) < 1e-7
    assert (Y[:, :off] == 7.0).all() and (Y[:, off + rows:] == 7.0).all()  # nothing outside the slot


@pytest.mark.parametrize("ggml_type", sorted(WTYPES), ids=lambda t: T(t).name)
def test_get_rows_exact(prg, ggml_type):
    rng = np.random.default_rng(ggml_type)
    rows, cols = 20, 512
    raw = random_blocks(T(ggml_type), rows, cols, rng)
    W = dequantize(raw, T(ggml_type)).reshape(rows, cols).astype(np.float32)
    ids = np.array([5, 0, 19, 5], np.int32)
    out = buf(prg, nbytes=4 * ids.size * cols)
    prg.get_rows(ggml_type, buf(prg, raw), cols, buf(prg, ids), out, cols, ids.size)
    np.testing.assert_array_equal(read(prg, out, (ids.size, cols)), W[ids])


def test_rms_norm(prg):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 576)).astype(np.float32) * 3
    w = rng.standard_normal(576).astype(np.float32)
    out = buf(prg, nbytes=4 * 4 * 576)
    wg = prg.tuning.wg
    prg.rms_norm(prg.queue, (wg, 4), (wg, 1), buf(prg, x), 576, 2, buf(prg, w), out, 576, 576, np.float32(1e-5))
    x64 = x[2:].astype(np.float64)
    ref = x64 / np.sqrt((x64 ** 2).mean(axis=1, keepdims=True) + 1e-5) * w
    assert nmse(read(prg, out, (4, 576)), ref) < 1e-12


@pytest.mark.parametrize("rope_type", [0, 2], ids=["NORM", "NEOX"])
def test_rope(prg, rope_type):
    from apr_numba.kernels.rope import rope_inplace, rope_tables

    rng = np.random.default_rng(rope_type)
    hd, n_heads, T_, pos0, width, col0 = 64, 3, 4, 9, 3 * 64 + 16, 16
    cos, sin = rope_tables(32, hd, 10000.0)
    x = rng.standard_normal((T_, width)).astype(np.float32)
    ref = x.copy()
    rope_inplace(ref, col0, n_heads, hd, pos0 + np.arange(T_, dtype=np.int64), cos, sin, rope_type)
    xb = buf(prg, x)
    prg.rope(prg.queue, (n_heads * hd // 2, T_), None, xb, width, col0, hd, pos0, buf(prg, cos), buf(prg, sin),
             rope_type)
    got = read(prg, xb, x.shape)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert (got[:, :col0] == x[:, :col0]).all()


def naive_attention(q, k, v, pos0, n_rep):
    """q (T, n_head, hd), k/v (n_pos, n_kv, hd) float64 -> (T, n_head, hd); causal, GQA, softmax(qk/sqrt(hd))v."""
    T_, n_head, hd = q.shape
    out = np.zeros_like(q)
    for t in range(T_):
        for h in range(n_head):
            s = k[:pos0 + t + 1, h // n_rep] @ q[t, h] / np.sqrt(hd)
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ v[:pos0 + t + 1, h // n_rep]
    return out


def test_attention_gqa_causal(prg):
    rng = np.random.default_rng(3)
    hd, n_head, n_kv, T_, pos0, n_ctx = 64, 6, 2, 3, 5, 16
    q_dim, kv_dim = n_head * hd, n_kv * hd
    qkv = rng.standard_normal((T_, q_dim + 2 * kv_dim)).astype(np.float32)
    kc = rng.standard_normal((2, n_ctx, kv_dim)).astype(np.float32)  # layer 1 is used
    vc = rng.standard_normal((2, n_ctx, kv_dim)).astype(np.float32)
    kc[1, pos0:pos0 + T_] = qkv[:, q_dim:q_dim + kv_dim]
    vc[1, pos0:pos0 + T_] = qkv[:, q_dim + kv_dim:]
    kc[1, pos0 + T_:] = np.nan  # positions after the last query must never be read
    vc[1, pos0 + T_:] = np.nan
    out = buf(prg, nbytes=4 * T_ * q_dim)
    scores = buf(prg, nbytes=4 * T_ * n_head * n_ctx)
    wg = prg.tuning.wg
    prg.attn(prg.queue, (wg, n_head, T_), (wg, 1, 1), buf(prg, qkv), qkv.shape[1], buf(prg, kc), buf(prg, vc),
             n_ctx * kv_dim, kv_dim, n_head // n_kv, pos0, scores, n_ctx, out, q_dim, np.float32(1 / np.sqrt(hd)),
             0, 0, 0, 0, 0, scores, scores, 0)
    ref = naive_attention(qkv[:, :q_dim].reshape(T_, n_head, hd).astype(np.float64),
                          kc[1].reshape(n_ctx, n_kv, hd).astype(np.float64),
                          vc[1].reshape(n_ctx, n_kv, hd).astype(np.float64), pos0, n_head // n_kv)
    assert nmse(read(prg, out, (T_, q_dim)), ref.reshape(T_, q_dim)) < 1e-10


def test_swiglu_add_argmax(prg):
    rng = np.random.default_rng(4)
    n_ff, T_ = 96, 3
    gu = rng.standard_normal((T_, 2 * n_ff)).astype(np.float32) * 4
    act = buf(prg, nbytes=4 * T_ * n_ff)
    prg.swiglu(prg.queue, (n_ff, T_), None, buf(prg, gu), act, n_ff, 0, 0)
    g, u = gu[:, :n_ff].astype(np.float64), gu[:, n_ff:].astype(np.float64)
    assert nmse(read(prg, act, (T_, n_ff)), g / (1 + np.exp(-g)) * u) < 1e-12

    x = rng.standard_normal((T_, 8)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    xb = buf(prg, x)
    prg.add(prg.queue, (x.size,), None, xb, buf(prg, b), 8)  # broadcast over rows (the QKV bias)
    np.testing.assert_array_equal(read(prg, xb, x.shape), x + b)

    v = rng.standard_normal(50001).astype(np.float32)
    v[[1234, 40000]] = 9.0  # a tie: the lowest index wins, as numpy.argmax
    ob = buf(prg, nbytes=4)
    wg = prg.tuning.wg
    prg.argmax(prg.queue, (wg,), (wg,), buf(prg, v), v.size, ob)
    assert int(read(prg, ob, (1,), np.int32)[0]) == int(np.argmax(v)) == 1234


def test_builds_are_warning_free(prg):
    """PoCL 3.0 cannot reload a cached build that had compiler warnings (its kernels vanish)."""
    for t in WTYPES:
        prg.quant(t)
    assert not any("warning" in log for log in prg.build_logs), prg.build_logs


def test_choose_tuning_respects_device_limits():
    from types import SimpleNamespace

    from apr_numba.backends.opencl_kernels import choose_tuning

    gpu = SimpleNamespace(type=cl.device_type.GPU, max_work_group_size=256, local_mem_size=48 * 1024)
    t = choose_tuning(gpu, 32)
    assert (t.lanes, t.rows) == (32, 4) and t.lanes * t.rows <= 256
    amd = choose_tuning(SimpleNamespace(type=cl.device_type.GPU, max_work_group_size=1024, local_mem_size=65536), 64)
    assert amd.lanes == 64
    small = choose_tuning(SimpleNamespace(type=cl.device_type.GPU, max_work_group_size=64, local_mem_size=4096), 32)
    assert small.lanes * small.rows <= 64 and small.wg <= 64 and small.tb * small.rows * small.lanes * 4 <= 2048


# -- 2. whole models: OpenCL vs CPU ----------------------------------------------------------------

@pytest.fixture(scope="module")
def ocl_model():
    from apr_numba.model.decoder import load

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load(name, backend="opencl", n_ctx=128)
            assert cache[name].backend == "opencl", cache[name].parity
        return cache[name]

    return get


def greedy_ids(model, ids, n: int, state):
    logits = model.eval(ids, state=state)[-1]
    first_logits, out = logits, []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = model.eval([out[-1]], state=state)[-1]
    return out, first_logits


@pytest.mark.parametrize("name", MODELS)
def test_greedy_20_tokens_equal_cpu(name, ocl_model):
    m = ocl_model(name)
    ids = m.encode(PROMPT)
    gpu_ids, gpu_logits = greedy_ids(m, ids, 20, m.new_state(64))
    cpu_ids, cpu_logits = greedy_ids(m, ids, 20, m.new_state(64, cpu=True))
    assert gpu_ids == cpu_ids, (m.decode(gpu_ids), m.decode(cpu_ids))
    cos = cosine(gpu_logits, cpu_logits)
    assert cos >= 0.999, cos
    assert m.parity.passed and len(m.parity.cosines) == 3 and min(m.parity.cosines) >= 0.999


def test_prefill_chunks_and_capture_match_cpu(ocl_model):
    """A prompt longer than one prefill chunk, all positions' logits and the layer capture."""
    m = ocl_model("smollm2-135m")
    be = m.opencl
    ids = (m.encode(PROMPT + " red, green and blue. " * 8))[:be.max_batch + 7]
    g_logits, g_cap = m.eval(ids, n_logits=len(ids), capture_layers=True, state=m.new_state(64))
    c_logits, c_cap = m.eval(ids, n_logits=len(ids), capture_layers=True, state=m.new_state(64, cpu=True))
    for t in (0, be.max_batch - 1, be.max_batch, len(ids) - 1):
        assert cosine(g_logits[t], c_logits[t]) >= 0.999, t
    assert cosine(g_cap[-1], c_cap[-1]) >= 0.999


# -- 3. the parity gate ------------------------------------------------------------------------------

def cli(*args: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for k in ("APR_OPENCL_FAULT", "APR_OPENCL_DEVICE", "APR_OPENCL_PARITY_STEPS"):
        env.pop(k, None)
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "apr_numba", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)


def test_fault_injection_rejected_with_exact_line_and_cpu_text():
    args = ("run", "smollm2-135m", "-p", PROMPT, "-n", "12")
    bad = cli(*args, "--backend", "opencl", extra_env={"APR_OPENCL_FAULT": "scale"})
    ref = cli(*args, "--no-gpu")
    assert bad.returncode == 0 and ref.returncode == 0, bad.stderr + ref.stderr
    lines = [ln for ln in bad.stderr.splitlines() if "parity" in ln or "OpenCL" in ln]
    assert len(lines) == 1, bad.stderr
    m = LINE.match(lines[0])
    assert m, lines[0]
    assert m.group(2) == "3" and 1 <= int(m.group(1)) <= 3
    assert bad.stdout == ref.stdout  # the fallback gives the CPU's text


def test_fault_injection_in_process_json(capsys):
    from apr_numba.model.decoder import load

    m = load("smollm2-135m", backend="opencl", n_ctx=64, opencl_fault="scale")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and LINE.match(err[0]), err
    assert m.backend == "cpu" and m.opencl is None
    assert not m.parity.passed and m.parity.step_failed >= 1 and m.parity.cosines[-1] < 0.99


def test_probe_exception_falls_back(capsys):
    from apr_numba.model.decoder import load

    m = load("smollm2-135m", backend="opencl", n_ctx=64, device=len(list_devices()) + 5)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("[apr-cpu-vs-gpu-output-parity-v1] OpenCL path rejected, attempting fallback: "
                             "probe failed: OpenCLError: OpenCL device"), err[0]
    assert m.backend == "cpu" and m.parity is not None and not m.parity.passed


class FakeBackend:
    """Returns the CPU's logits with a perturbation at one step (or raises)."""

    device_name = "fake"

    def __init__(self, model, mode: str, at: int = 2):
        self.model, self.mode, self.at, self.k = model, mode, at, 0

    def new_state(self, n):
        return self.model.new_state(n, cpu=True)

    def eval(self, ids, n_logits, state):
        self.k += 1
        logits = self.model.eval(ids, n_logits, state=state).copy()
        if self.k == self.at:
            if self.mode == "raise":
                raise MemoryError("CL_OUT_OF_RESOURCES")
            if self.mode == "swap-far":  # the CPU's worst token wins
                logits[-1, np.argmin(logits[-1])] = logits[-1].max() + 1.0
        if self.mode == "batched-noise" and len(ids) > 1:  # only the prefill (matrix-matrix) path is broken
            logits = logits + np.random.default_rng(0).standard_normal(logits.shape).astype(np.float32) * 5
        return logits


def test_gate_rules(loaded_model, monkeypatch):
    m = loaded_model("smollm2-135m")
    bos = m.tokenizer.bos_id or 0
    ok = parity.run_parity_gate(m, FakeBackend(m, "none"), bos, 5)
    assert ok.passed and len(ok.cosines) == 5 and all(ok.argmax_equal)
    boom = parity.run_parity_gate(m, FakeBackend(m, "raise"), bos, 3)
    assert not boom.passed and boom.step_failed == 2
    assert boom.reason.startswith("probe failed: MemoryError: CL_OUT_OF_RESOURCES") and boom.reason.endswith("2/3")
    # argmax may differ only at a near-tie: the device's pick within 1 % of the CPU's best
    far = parity.run_parity_gate(m, FakeBackend(m, "swap-far"), bos, 3)
    assert not far.passed and far.step_failed == 2 and far.reason.startswith("argmax vs CPU")
    batched = parity.run_parity_gate(m, FakeBackend(m, "batched-noise", at=0), bos, 3)
    assert not batched.passed and batched.path == "batched" and len(batched.cosines) == 3
    assert re.match(r"cosine vs CPU = \d\.\d{6} \(< 0\.99\) at step 1/3$", batched.reason), batched.reason
    assert ok.batched_cosines and min(ok.batched_cosines) > 0.9999
    monkeypatch.setenv("APR_OPENCL_PARITY_STEPS", "17")
    with pytest.raises(parity.ArgumentError):
        parity.parity_steps()
    monkeypatch.setenv("APR_OPENCL_PARITY_STEPS", "1")
    assert parity.parity_steps() == 1


def test_gate_near_tie_rule():
    """A 0.5 % gap between the CPU's best and the device's pick is a near-tie, 5 % is not."""

    class Fixed:
        device_name = "fixed"

        def __init__(self, rows):
            self.rows, self.k = rows, 0

        def new_state(self, n):
            return None

        def eval(self, ids, n_logits=1, state=None):  # the decode step, then the batched re-run
            self.k += 1
            return self.rows[min(self.k, len(self.rows)) - 1][None, :]

    for gap, passes in ((0.05, True), (0.5, False)):
        cpu = np.array([1.0, 10.0, 10.0 - gap, -3.0], np.float32)
        dev = np.array([1.0, 10.0 - gap, 10.0, -3.0], np.float32)
        res = parity.run_parity_gate(Fixed([cpu]), Fixed([dev]), 0, 1)
        assert res.passed is passes, (gap, res)
        assert res.argmax_equal == [False]


def test_auto_on_a_cpu_only_opencl_machine_stays_on_cpu(capsys):
    if any(d.is_gpu for d in list_devices()):
        pytest.skip("a GPU is present: auto would use it")
    from apr_numba.model.decoder import load

    m = load("smollm2-135m", backend="auto", n_ctx=64)
    assert m.backend == "cpu" and m.parity is None
    assert capsys.readouterr().err == ""


# -- 4. --no-gpu ------------------------------------------------------------------------------------

def test_no_gpu_prints_nothing_and_never_imports_pyopencl():
    code = ("import sys; from apr_numba.cli.main import main; rc = main(['run', 'smollm2-135m', '-p', 'Hi', '-n', '3', "
            "'--no-gpu']); print('PYOPENCL' if 'pyopencl' in sys.modules else 'CLEAN', file=sys.stderr); "
            "sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env={**os.environ, "APR_OPENCL_FAULT": "scale"})
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "CLEAN"
    assert not re.search(r"parity|opencl", r.stderr, re.IGNORECASE), r.stderr


# -- 5. transfers and device memory ---------------------------------------------------------------

def test_transfer_counters_32_token_generation(ocl_model):
    m = ocl_model("smollm2-135m")
    be = m.opencl
    c = m.config
    assert be.model_bytes <= be.weight_bytes <= 1.10 * be.model_bytes  # GWR-001
    assert be.weight_bytes == sum(b.size for b in be.weight_buffers)
    if be.device.unified_memory:  # GWR-005: host-accessible allocations on unified-memory devices (PoCL)
        assert all(b.flags & cl.mem_flags.ALLOC_HOST_PTR for b in be.weight_buffers)
    assert be.load_counters.weight_uploads > 0
    assert be.counters.weight_uploads == 0  # the gate's probes and everything since: no weight copies
    m.reset()
    ids = m.encode(PROMPT)
    logits = m.eval(ids)[-1]
    prefill = be.last_step
    assert prefill.h2d_bytes == 4 * len(ids) and prefill.h2d_copies == 1
    assert prefill.d2h_bytes == 4 * c.n_vocab and prefill.d2h_copies == 1
    steps_before = be.steps
    for _ in range(32):
        logits = m.eval([int(np.argmax(logits))])[-1]
        s = be.last_step
        assert (s.h2d_bytes, s.h2d_copies, s.weight_uploads) == (4, 1, 0)  # only the token id goes up
        assert (s.d2h_bytes, s.d2h_copies) == (4 * c.n_vocab, 1)  # only the logits row comes back
    assert be.steps == steps_before + 32
    assert be.counters.weight_uploads == 0
    # greedy on the device: 4 bytes back instead of the logits row
    st = be.new_state(64)
    tok = be.eval_argmax(ids, st)
    assert tok == int(np.argmax(m.eval(ids, state=m.new_state(64, cpu=True))[-1]))
    assert be.last_step.d2h_bytes == 4
    m.reset()


# -- 6. the tracing hook (OpenCLBackend.run(dbg=...)) ------------------------------------------------

@pytest.mark.parametrize("name, fault", [("smollm2-135m", f) for f in (
    None, "rope-theta@1", "rope-style@1", "attn-scale@1", "causal-mask-off@1", "gqa-map@1", "softmax-no-max@1",
    "ffn-swap@1", "rmsnorm-eps@1")] + [("qwen2.5-coder-0.5b", None), ("qwen2.5-coder-0.5b", "qkv-bias-drop@1")])
def test_trace_and_teaching_faults_match_cpu(name, fault, ocl_model):
    """Every stage of layers 0..2 (plus final_norm, lm_head) on OpenCL equals the CPU's, with each fault."""
    from apr_numba.debug.tracing import trace

    m = ocl_model(name)
    kw = {"stages": "all", "layers": "0..2", "inject": fault}
    cpu, ocl = trace(m, PROMPT, **kw), trace(m, PROMPT, backend="opencl", **kw)
    assert cpu.tensors.keys() == ocl.tensors.keys()
    for k, v in cpu.tensors.items():
        a, b = np.nan_to_num(ocl.tensors[k], posinf=1e4), np.nan_to_num(v, posinf=1e4)
        assert cosine(a, b) >= 0.999, (fault, k, cosine(a, b))
