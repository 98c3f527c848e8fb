"""The persistent-worker decode (apr_numba/backends/cpu_decode.py) and its atomics (apr_numba/kernels/sync.py).

References, never the worker path itself:

* the atomics: a naive count. Every task index of a step is claimed exactly once by 1..4 concurrent workers
  (a plain array written at each claimed index, then counted in NumPy), the done counter ends at the number of
  tasks, and ``atomic_add`` returns the old value as a plain read-add-write would in one thread.
* the decoder: ``cpu_forward.forward``, the region-per-product path that tests/test_arch_hf_parity.py and
  tests/test_parity.py check against HF transformers. The worker path runs the same task functions in the same
  order, so logits, the layer capture and the K/V caches must agree to float32 rounding (relative 1e-5; the
  two are compiled into different callers, and fast-math lets LLVM reassociate a sum differently) with the same
  argmax, for a prompt, decode steps and a batched decode step of several sequences, in float32 and int8
  activations, on every dense tiny architecture (llama SentencePiece, Llama-3, qwen3 QK-norm, gemma3
  post-norms / GeGLU / sliding window / embedding scale) and the real smollm2; and 1, 2 and 3 workers must give
  the same bits (``np.array_equal``: each output element is computed by one task, whoever runs it).
* HF transformers, indirectly: ``Model.eval`` runs the worker path for every short untraced call (checked here
  with a spy on the fallback), so tests/test_arch_hf_parity.py's greedy continuations against HF's recorded
  tokens run through it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from numba import njit, prange

from apr_numba.backends import cpu_decode, cpu_forward
from apr_numba.kernels.sync import atomic_add, claim, finish, wait_done
from apr_numba.model.decoder import load

ROOT = Path(__file__).resolve().parent.parent
ARCH = ROOT / "tests" / "fixtures" / "arch"
SMOLLM = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@njit(parallel=True, cache=False)
def _claim_all(ctr, hits, who, n_workers, n_tasks):
    for wk in prange(n_workers):
        i = claim(ctr, 0)
        while i < n_tasks:
            hits[i] += 1
            who[i] = wk
            finish(ctr, 0)
            i = claim(ctr, 0)
        wait_done(ctr, 0, n_tasks)


@njit(cache=False)
def _fetch_adds(arr, vals):
    out = np.empty(vals.shape[0], np.int64)
    for j in range(vals.shape[0]):
        out[j] = atomic_add(arr, 1, vals[j])
    return out


@pytest.mark.parametrize("n_workers", [1, 2, 4])
def test_every_task_claimed_exactly_once(n_workers):
    n = 200_000
    ctr = np.zeros(2, np.int64)
    hits = np.zeros(n, np.int64)
    who = np.full(n, -1, np.int64)
    _claim_all(ctr, hits, who, n_workers, n)
    assert (hits == 1).all()
    assert ctr[1] == n  # done counter
    assert ctr[0] == n + n_workers  # each worker's last claim found the step exhausted
    assert set(np.unique(who)) <= set(range(n_workers))


def test_atomic_add_returns_the_old_value():
    arr = np.array([7, 10, 3], np.int64)
    vals = np.array([5, -2, 0, 9], np.int64)
    old = _fetch_adds(arr, vals)
    assert old.tolist() == [10, 15, 13, 13]  # a running sum, read before each add
    assert arr.tolist() == [7, 22, 3]


def _run(model, path, toks, pos, seq, k, v, n_out, n_workers):
    """(logits, layer capture) of one call of ``path``."""
    c = model.config
    logits = np.empty((n_out, c.n_vocab), np.float32)
    cap = np.zeros((c.n_layer, len(toks), c.n_embd), np.float32)
    args = (np.asarray(toks, np.int64), np.asarray(pos, np.int64), np.asarray(seq, np.int64), model._cfg,
            model._fp, model.weights.kernel_args(), model._rope_args(), k, v, logits, cap)
    if path == "workers":
        cpu_decode.forward_workers(*args, np.int64(n_workers))
    else:
        cpu_forward.forward(*args, model.no_debug)
    return logits, cap


def close(got, want, key) -> None:
    """Equal to float32 rounding: the two paths run the same task functions, but compiled into different
    callers (with fast-math reassociation LLVM may order a sum differently): relative error <= 1e-5."""
    g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert g.shape == w.shape, key
    assert np.abs(g - w).max() <= 1e-5 * max(np.abs(w).max(), 1e-30), key


def workers_equal_forward(model, seed: int = 0) -> None:
    """A 5-token prompt into sequence 0, 3 decode steps, then a batched step of 3 sequences: both paths give the
    same logits, block outputs and KV caches (to float32 rounding, same argmax), and 1, 2 and 3 workers the same
    bits."""
    rng = np.random.default_rng(seed)
    V, c = model.config.n_vocab, model.config
    prompt = rng.integers(0, V, 5)
    steps = rng.integers(0, V, 3)
    batch = rng.integers(0, V, 3)
    shape = (3, c.n_layer, 32, c.n_head_kv * c.head_dim)
    results = {}
    for path, nw in (("forward", 0), ("workers", 1), ("workers", 2), ("workers", 3)):
        k, v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        outs = [_run(model, path, prompt, range(5), [0] * 5, k, v, 2, nw)]
        for i, t in enumerate(steps):
            outs.append(_run(model, path, [t], [5 + i], [0], k, v, 1, nw))
        outs.append(_run(model, path, prompt[:2], [0, 1], [1, 1], k, v, 1, nw))  # sequence 1: 2 positions
        outs.append(_run(model, path, batch, [8, 2, 0], [0, 1, 2], k, v, 3, nw))  # one token of each of 3
        results[(path, nw)] = (outs, k, v)
    want_outs, want_k, want_v = results[("forward", 0)]
    for key, (outs, k, v) in results.items():
        for (got, got_cap), (want, want_cap) in zip(outs, want_outs, strict=True):
            close(got, want, key)
            close(got_cap, want_cap, key)
            assert (got.argmax(-1) == want.argmax(-1)).all(), key
        close(k, want_k, key)
        close(v, want_v, key)
    one_outs, one_k, one_v = results[("workers", 1)]
    for nw in (2, 3):  # one compiled function: the number of workers does not change a bit
        outs, k, v = results[("workers", nw)]
        for (got, got_cap), (want, want_cap) in zip(outs, one_outs, strict=True):
            assert np.array_equal(got, want) and np.array_equal(got_cap, want_cap), nw
        assert np.array_equal(k, one_k) and np.array_equal(v, one_v), nw
    assert np.isfinite(want_outs[-1][0]).all() and np.abs(want_outs[-1][1]).max() > 0


@pytest.mark.parametrize("activations", ["f32", "int8"])
@pytest.mark.parametrize("name", ["llama-spm", "llama3", "qwen3", "gemma3"])
def test_tiny_arch_workers_equal_forward(name, activations):
    model = load(ARCH / f"{name}.gguf", backend="cpu", n_ctx=32, warmup=False, activations=activations)
    fams = {int(t[0]) for t in model.weights.kernel_args()[0]}
    assert all(f >= 5 for f in fams) if activations == "int8" else all(f < 5 for f in fams), fams
    workers_equal_forward(model)


def test_workers_with_layers_of_mixed_activation_layouts():
    """A file may mix types across layers, so one layer's products take int8 blocks and the next float rows:
    layer 0 of an int8 model gets the float layout back (quants/blocks.py: families < FAMILY_U4V), so that the
    int8 blocks the later layers need are not decided by the first layer's matrices."""
    from apr_numba.kernels.matmul import packed_list

    f32 = load(ARCH / "llama3.gguf", backend="cpu", n_ctx=32, warmup=False, activations="f32")
    q8 = load(ARCH / "llama3.gguf", backend="cpu", n_ctx=32, warmup=False, activations="int8")
    mats = [q8.weights.mats[i] for i in range(len(q8.weights.mats))]
    mats[:7] = [f32.weights.mats[i] for i in range(7)]
    q8.weights.mats = packed_list(mats)
    fams = [int(m[0]) for m in mats]
    assert max(fams[:7]) < 5 and min(fams[7:]) >= 5, fams
    workers_equal_forward(q8, seed=2)


def test_smollm2_workers_equal_forward_f32_and_int8_and_load_activations(monkeypatch):
    if not SMOLLM.is_file():
        pytest.skip(f"needs {SMOLLM.name}")
    workers_equal_forward(load(SMOLLM, backend="cpu", n_ctx=32, warmup=False))
    model = load(SMOLLM, backend="cpu", n_ctx=32, warmup=False, activations="int8")
    assert int(model.weights.kernel_args()[0][0][0]) >= 5  # the VNNI families (quants/blocks.py FAMILY_U4V..)
    workers_equal_forward(model, seed=1)
    monkeypatch.setenv("APR_NUMBA_ACTIVATIONS", "int8")  # the environment: the default when load is not told
    assert int(load(ARCH / "llama3.gguf", n_ctx=32, warmup=False).weights.kernel_args()[0][0][0]) >= 5
    assert int(load(ARCH / "llama3.gguf", n_ctx=32, warmup=False, activations="f32").weights.kernel_args()[0][0][0]) < 5


def test_load_refuses_an_unknown_activation_mode():
    from apr_numba.errors import ArgumentError

    with pytest.raises(ArgumentError, match="int8"):
        load(ARCH / "llama3.gguf", n_ctx=32, warmup=False, activations="int4")


def test_eval_takes_the_worker_path_and_traced_calls_do_not(monkeypatch):
    """Short untraced calls (with layer capture too: the dashboard's) never reach cpu_forward.forward; a traced
    (non-default dbg) call does."""
    model = load(ARCH / "gemma3.gguf", backend="cpu", n_ctx=32, warmup=False)
    calls = []
    real = cpu_decode.forward

    def spy(*a):
        calls.append(a[0].shape[0])
        return real(*a)

    monkeypatch.setattr(cpu_decode, "forward", spy)
    model.eval([1, 2, 3], n_logits=1)
    model.eval([4])
    model.eval([5], capture_layers=True)
    assert calls == []
    logits = np.empty((1, model.config.n_vocab), np.float32)
    model.forward_into(np.array([5], np.int64), logits, model.no_capture, model.state, dbg=model.debug_args())
    assert calls == [1]
    monkeypatch.setenv("APR_NUMBA_WORKERS", "0")
    model.eval([6])
    assert calls == [1, 1]


def test_small_calls_run_on_one_worker():
    """Calls whose layers are below MIN_LAYER_MACS skip the cross-core synchronisation (gate WS-001's minimal
    model); real models use every thread."""
    import numba

    from apr_numba.backends.cpu_decode import MIN_LAYER_MACS, n_workers_for
    from apr_numba.gates.ws import minimal_model

    model = load(ARCH / "llama3.gguf", backend="cpu", n_ctx=32, warmup=False)
    c = model.config
    layer = c.n_embd * (c.n_head + 2 * c.n_head_kv) * c.head_dim + c.n_head * c.head_dim * c.n_embd \
        + 3 * c.n_embd * c.n_ff  # Q, K, V, output and the three FFN products, counted by hand
    assert n_workers_for(1, model._cfg) == (1 if layer < MIN_LAYER_MACS else numba.get_num_threads())
    assert n_workers_for(64, model._cfg) == numba.get_num_threads()
    assert n_workers_for(1, minimal_model(model, n_ctx=16)._cfg) == 1
