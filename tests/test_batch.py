"""The batched decode step (``Model.eval_batch``, one forward over B sequences) and the scheduler on it.

References, never the batched path itself:

* HF transformers' last-position logits of the committed fixtures (``hf_smollm2-135m.npz``, the tiny
  ``tests/fixtures/arch/<name>_ref.npz``; recorded by make_hf_fixtures.py / make_arch_fixtures.py): the batch
  step of prompt i's last token, with the rest of prompt i in sequence i's cache, matches HF's logits of
  prompt i (cosine >= 0.999 / 0.9999, the thresholds of test_parity / test_arch_hf_parity).
* the single-sequence forward (``Model.eval`` on a cache of its own, tested against HF and the float64
  oracle elsewhere): the same tokens at the same positions give the same logits to float32 accumulation
  order (cosine >= 1 - 1e-6, same argmax), for prompts of different lengths, gemma3's 8-position sliding
  window crossed, qwen3moe's experts, B = 2 (row by row), 4 and 6 (4-token tiles) and BLAS_MIN_T + 1 (the
  products through BLAS).
* greedy decoding of each prompt alone (plain argmax over ``Model.eval`` logits): 4 concurrent scheduler
  jobs of different prompt lengths and lengths produce exactly those tokens, also when only 2 slots serve
  them, so that jobs retire and waiting ones are admitted between steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from apr_numba.errors import ArgumentError
from apr_numba.generation.sampling import SamplingParams
from apr_numba.model.decoder import load
from apr_numba.serve.scheduler import Job, Scheduler

ROOT = Path(__file__).resolve().parent.parent
ARCH = ROOT / "tests" / "fixtures" / "arch"
SMOLLM = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
N_CTX = 128
TIGHT = 1 - 1e-6


def cosine(a, b) -> np.ndarray:
    """Row-wise cosine of two (B, n) arrays, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def smollm():
    if not SMOLLM.is_file():
        pytest.skip(f"needs {SMOLLM.name}")
    return load(SMOLLM, backend="cpu", n_ctx=N_CTX)


def _no_sequential(model, monkeypatch):
    """Make Model.eval fail, so that a test proves eval_batch ran the batched forward (not one eval per state)."""
    def boom(*a, **k):
        raise AssertionError("eval_batch fell back to one eval per state")

    monkeypatch.setattr(model, "eval", boom)


def batch_vs_hf(model, ref: dict, n: int, monkeypatch) -> np.ndarray:
    """Logits (n, n_vocab) of the batch step of each prompt's last token, prompts i < n prefilled minus one."""
    prompts = [[int(t) for t in ref[f"prompt_ids_{i}"]] for i in range(n)]
    states = model.new_states(n, N_CTX)
    for ids, st in zip(prompts, states, strict=True):
        model.eval(ids[:-1], n_logits=0, state=st)
    with monkeypatch.context() as mp:
        _no_sequential(model, mp)
        got = model.eval_batch([ids[-1] for ids in prompts], states)
    assert [st.n_past for st in states] == [len(ids) for ids in prompts]
    return got


def test_smollm2_batch_step_matches_hf(smollm, monkeypatch):
    hf = dict(np.load(ROOT / "tests" / "fixtures" / "hf_smollm2-135m.npz"))
    got = batch_vs_hf(smollm, hf, 4, monkeypatch)
    want = np.stack([hf[f"last_logits_{i}"] for i in range(4)])
    assert cosine(got, want).min() >= 0.999
    assert (got.argmax(1) == want.argmax(1)).all()


@pytest.mark.parametrize("name", ["gemma3", "qwen3moe"])
def test_tiny_arch_batch_step_matches_hf(name, monkeypatch):
    ref = dict(np.load(ARCH / f"{name}_ref.npz"))
    model = load(ARCH / f"{name}.gguf", backend="cpu", n_ctx=N_CTX, warmup=False)
    got = batch_vs_hf(model, ref, 5, monkeypatch)  # prompts of 11..41 tokens: past gemma3's window of 8
    want = np.stack([ref[f"last_logits_{i}"] for i in range(5)])
    assert cosine(got, want).min() >= 0.9999
    assert (got.argmax(1) == want.argmax(1)).all()


def batch_vs_single(model, lens, steps: int, monkeypatch, seed: int = 0) -> None:
    """B sequences of prompt lengths ``lens`` decoded together for ``steps`` steps, against each alone."""
    rng = np.random.default_rng(seed)
    V = model.config.n_vocab
    states = model.new_states(len(lens), N_CTX)
    alone = [model.new_state(N_CTX) for _ in lens]
    for n, st, st1 in zip(lens, states, alone, strict=True):
        ids = rng.integers(0, V, n)
        model.eval(ids, n_logits=0, state=st)
        model.eval(ids, n_logits=0, state=st1)
    for _ in range(steps):
        toks = rng.integers(0, V, len(lens))
        want = np.concatenate([model.eval([t], state=st1) for t, st1 in zip(toks, alone, strict=True)])
        with monkeypatch.context() as mp:
            _no_sequential(model, mp)
            got = model.eval_batch(toks, states)
        assert got.shape == (len(lens), V) and got.dtype == np.float32
        assert cosine(got, want).min() >= TIGHT
        assert (got.argmax(1) == want.argmax(1)).all()
    assert [s.n_past for s in states] == [s.n_past for s in alone]
    for st, st1 in zip(states, alone, strict=True):  # the caches hold the same K/V (to float32 accumulation order)
        for x, y in ((st.k, st1.k), (st.v, st1.v)):
            a, b = x[:, :st.n_past].astype(np.float64), y[:, :st1.n_past].astype(np.float64)
            assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b)


def test_smollm2_batch_equals_single(smollm, monkeypatch):
    batch_vs_single(smollm, [1, 5, 17, 9], 3, monkeypatch)  # B=4: the 4-row product tiles
    batch_vs_single(smollm, [3, 8], 2, monkeypatch, seed=1)  # B=2: row by row


@pytest.mark.parametrize("name", ["gemma3", "qwen3moe", "llama3"])
def test_tiny_arch_batch_equals_single(name, monkeypatch):
    model = load(ARCH / f"{name}.gguf", backend="cpu", n_ctx=N_CTX, warmup=False)
    # 6 sequences: one 4-row tile and 2 rows; lengths on both sides of gemma3's 8-position window
    batch_vs_single(model, [2, 7, 8, 12, 20, 1], 4, monkeypatch)


def test_batch_of_blas_size_equals_single(monkeypatch):
    """B >= BLAS_MIN_T sequences: the products go through BLAS sgemm, attention stays per token."""
    from apr_numba.kernels.matmul import BLAS_MIN_T

    model = load(ARCH / "gemma3.gguf", backend="cpu", n_ctx=N_CTX, warmup=False)
    batch_vs_single(model, [1 + (3 * i) % 13 for i in range(BLAS_MIN_T + 1)], 2, monkeypatch)


def test_eval_batch_errors(smollm):
    states = smollm.new_states(2, 16)
    with pytest.raises(ArgumentError, match="one token per state"):
        smollm.eval_batch([1, 2, 3], states)
    with pytest.raises(ArgumentError, match="twice"):
        smollm.eval_batch([1, 2], [states[0], states[0]])
    with pytest.raises(ArgumentError, match="out of range"):
        smollm.eval_batch([1, smollm.config.n_vocab], states)
    states[1].n_past = 16
    with pytest.raises(ArgumentError, match="exceed the context"):
        smollm.eval_batch([1, 2], states)
    with pytest.raises(ArgumentError, match="n_seq"):
        smollm.new_states(0)


def test_eval_batch_of_separate_states_runs_one_by_one(smollm):
    """States not made together (no shared stack) still work, evaluated one after another."""
    a, b = smollm.new_state(16), smollm.new_state(16)
    got = smollm.eval_batch([5, 9], [a, b])
    want = np.concatenate([smollm.eval([5], state=smollm.new_state(16)), smollm.eval([9], state=smollm.new_state(16))])
    np.testing.assert_array_equal(got, want)
    assert a.n_past == b.n_past == 1


def greedy_alone(model, ids, n: int, eos) -> list[int]:
    """Plain-argmax greedy continuation of ``ids`` on a cache of its own, stopping at an EOS id."""
    st = model.new_state(N_CTX)
    logits = model.eval(ids, state=st)[-1]
    out = []
    for _ in range(n):
        tok = int(np.argmax(logits))
        if tok in eos:
            break
        out.append(tok)
        if len(out) == n:
            break
        logits = model.eval([tok], state=st)[-1]
    return out


@pytest.mark.parametrize("n_parallel", [4, 2])
def test_scheduler_concurrent_greedy_equals_alone(smollm, n_parallel):
    prompts = ["The capital of France is", "List the numbers from 1 to 10: 1, 2,",
               "Once upon a time, in a small village by the sea, there lived an old fisherman who", "def add(a, b):"]
    max_tokens = [12, 5, 9, 16]  # different lengths: jobs retire at different steps
    ids = [smollm.encode(p) for p in prompts]
    assert len({len(i) for i in ids}) == 4
    want = [greedy_alone(smollm, i, n, smollm.tokenizer.eos_ids) for i, n in zip(ids, max_tokens, strict=True)]

    sched = Scheduler(smollm, n_parallel=n_parallel, queue_size=4, n_ctx=N_CTX)
    results: dict[int, object] = {}
    slot_jobs = []  # per step: the job each slot holds
    batched = []
    orig = smollm.eval_batch

    def spy(toks, states):
        batched.append(len(states))
        return orig(toks, states)

    def done(k):
        return lambda item: None if hasattr(item, "token_id") else results.__setitem__(k, item)

    smollm.eval_batch = spy
    try:
        for k, (i, n) in enumerate(zip(ids, max_tokens, strict=True)):
            sched.submit(Job(i, SamplingParams(), n, done(k)))
        while sched.waiting or sched.n_active:  # the engine loop, on this thread: admit, then one step
            sched._admit()
            slot_jobs.append([id(s.job) if s.job is not None else None for s in sched.slots])
            sched.step()
    finally:
        del smollm.eval_batch
    assert sorted(results) == [0, 1, 2, 3]
    for k in range(4):
        assert not isinstance(results[k], Exception), results[k]
        assert results[k].token_ids == want[k], (k, smollm.decode(results[k].token_ids), smollm.decode(want[k]))
    assert sched.n_completed == 4
    assert max(batched) == n_parallel  # the active slots were decoded in one forward
    if n_parallel == 2:  # 4 jobs through 2 slots: a slot took a new job after its first one retired
        for si in range(2):
            held = [row[si] for row in slot_jobs if row[si] is not None]
            assert len(set(held)) >= 2, f"slot {si} served only one job"
