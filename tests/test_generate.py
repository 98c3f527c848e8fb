"""The Python generation API (apr_numba/generation/generate.py) on SmolLM2-135M: determinism, streaming, seeded
sampling, stop strings, EOS, max_tokens, the context limit, eager argument errors, and KV-cache
correctness (incremental decode == full-sequence logits)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from apr_numba.errors import ArgumentError
from apr_numba.generation.generate import GenerationResult, generate, generate_events, run
from apr_numba.generation.sampling import SamplingParams
from apr_numba.model.decoder import load

ROOT = Path(__file__).resolve().parent.parent
SMOLLM = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
pytestmark = pytest.mark.skipif(not SMOLLM.is_file(), reason=f"needs {SMOLLM.name}")

PROMPT = "The capital of France is"
N = 32
CHAT_QUESTIONS = ["What is the capital of France?", "Hi", "What is 2+2?", "Say hello."]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def model():
    return load("smollm2-135m")


@pytest.fixture(scope="module")
def small_ctx_model():
    return load(SMOLLM, n_ctx=32)


@pytest.fixture(scope="module")
def greedy(model) -> GenerationResult:
    """The greedy 32-token continuation of PROMPT (computed once)."""
    return run(model, PROMPT, max_tokens=N)


# -- greedy / streaming ------------------------------------------------------------------------

def test_greedy_result_is_consistent(model, greedy):
    assert greedy.text.strip()
    assert greedy.prompt_token_ids == model.encode(PROMPT)
    assert 0 < len(greedy.token_ids) <= N
    if greedy.stop_reason == "length":
        assert len(greedy.token_ids) == N
    else:
        assert greedy.stop_reason == "eos"
    assert model.decode(greedy.token_ids) == greedy.text
    assert greedy.threads >= 1 and greedy.backend == "cpu"
    assert greedy.prefill_s > 0 and greedy.decode_s > 0


def test_greedy_is_deterministic(model, greedy):
    assert generate(model, PROMPT, max_tokens=N) == greedy.text
    assert generate(model, PROMPT, max_tokens=N) == greedy.text
    # seed is irrelevant when greedy
    assert generate(model, PROMPT, max_tokens=N, seed=123) == greedy.text


def test_greedy_prefix_property(model, greedy):
    """Fewer max_tokens gives a prefix of the same continuation."""
    short = run(model, PROMPT, max_tokens=5)
    assert short.token_ids == greedy.token_ids[:5]
    assert greedy.text.startswith(short.text)


def test_stream_pieces_join_to_text(model, greedy):
    it = generate(model, PROMPT, max_tokens=N, stream=True)
    assert not isinstance(it, str)
    pieces = list(it)
    assert len(pieces) > 1
    assert all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == greedy.text


def test_on_token_events(model, greedy):
    events = []
    res = run(model, PROMPT, max_tokens=N, on_token=events.append)
    assert res.text == greedy.text
    assert "".join(e.text for e in events) == res.text
    ids = [e.token_id for e in events if e.token_id >= 0]
    assert ids == res.token_ids
    assert [e.index for e in events if e.token_id >= 0] == list(range(len(ids)))


# -- seeded sampling ------------------------------------------------------------------------

def sample(model, seed, stream=False):
    out = generate(model, PROMPT, max_tokens=N, temperature=0.8, top_k=40, seed=seed, stream=stream)
    return out if not stream else "".join(out)


def test_same_seed_same_text(model):
    a = sample(model, 7)
    assert a.strip()
    assert sample(model, 7) == a
    assert sample(model, 7, stream=True) == a


def test_different_seeds_differ(model):
    texts = {sample(model, s) for s in (1, 2, 3)}
    # Over 32 sampled tokens at temperature 0.8 three seeds agreeing everywhere is vanishingly unlikely.
    assert len(texts) >= 2


# -- stop strings / max_tokens -------------------------------------------------------------

def pick_stop(text: str) -> str:
    """A word of the greedy continuation that does not start it (so the stopped text is non-trivial)."""
    for m in re.finditer(r"[A-Za-z]{3,}", text):
        if text.find(m.group()) > 0:
            return m.group()
    pytest.skip(f"no usable stop word in {text!r}")


def test_stop_string_ends_text_before_it(model, greedy):
    s = pick_stop(greedy.text)
    expect = greedy.text[: greedy.text.find(s)]
    res = run(model, PROMPT, max_tokens=N, stop=[s])
    assert res.stop_reason == "stop"
    assert res.text == expect and s not in res.text
    assert generate(model, PROMPT, max_tokens=N, stop=[s]) == expect
    assert "".join(generate(model, PROMPT, max_tokens=N, stop=[s], stream=True)) == expect
    # a stop string that never occurs changes nothing; several: the first occurrence wins
    assert generate(model, PROMPT, max_tokens=N, stop=["\x00never\x00"]) == greedy.text
    assert generate(model, PROMPT, max_tokens=N, stop=["\x00never\x00", s]) == expect


def test_stop_given_as_a_single_string(model, greedy):
    """``stop="word"`` is one stop string, not a set of characters."""
    s = pick_stop(greedy.text)
    expect = greedy.text[: greedy.text.find(s)]
    assert generate(model, PROMPT, max_tokens=N, stop=s) == expect
    assert run(model, PROMPT, max_tokens=N, stop=s).text == expect


def test_max_tokens_zero(model):
    assert generate(model, PROMPT, max_tokens=0) == ""
    assert list(generate(model, PROMPT, max_tokens=0, stream=True)) == []
    res = run(model, PROMPT, max_tokens=0)
    assert res.text == "" and res.token_ids == [] and res.stop_reason == "length"


def test_max_tokens_one(model, greedy):
    res = run(model, PROMPT, max_tokens=1)
    assert res.token_ids == greedy.token_ids[:1] and res.stop_reason == "length"


# -- EOS ------------------------------------------------------------------------------------

def test_chat_stops_at_eos(model):
    im_start = model.encode("<|im_start|>")
    im_end = model.encode("<|im_end|>")
    assert len(im_start) == 1 and len(im_end) == 1
    for q in CHAT_QUESTIONS:
        res = run(model, q, max_tokens=60, chat=True)
        if res.stop_reason == "eos":
            break
    else:
        pytest.fail(f"no EOS within 60 tokens for any of {CHAT_QUESTIONS}")
    assert res.prompt_token_ids[0] == im_start[0]
    assert res.prompt_token_ids[-1] != im_end[0]  # generation prompt: ends after "assistant\n"
    assert 0 < len(res.token_ids) < 60
    assert not set(res.token_ids) & model.tokenizer.eos_ids  # the EOS token is not part of the output
    assert "<|im_end|>" not in res.text and "<|endoftext|>" not in res.text
    assert res.text.strip() and res.text == model.decode(res.token_ids)
    assert generate(model, q, max_tokens=60, chat=True) == res.text
    # with a budget shorter than the answer the reason is "length"
    short = run(model, q, max_tokens=len(res.token_ids) - 1, chat=True) if len(res.token_ids) > 1 else None
    if short is not None:
        assert short.stop_reason == "length" and short.token_ids == res.token_ids[:-1]


# -- context ---------------------------------------------------------------------------------

def test_generation_stops_when_context_is_full(small_ctx_model):
    m = small_ctx_model
    ids = (m.encode("one two three four five six seven eight nine ten " * 4))[: m.n_ctx - 3]
    assert len(ids) == m.n_ctx - 3
    res = GenerationResult()
    list(generate_events(m, ids, SamplingParams(), 100, (), res))
    assert res.stop_reason in ("context", "eos")
    if res.stop_reason == "context":
        # the last token is sampled from the logits of position n_ctx - 1 and never fed back
        assert len(res.token_ids) == m.n_ctx - len(ids) + 1
    assert m.n_past <= m.n_ctx


# -- eager argument errors ---------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("kwargs, word", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"temperature": -0.5}, "temperature"),
    ({"repeat_penalty": 0.0}, "repeat_penalty"),
    ({"seed": -3}, "seed"),
    ({"stop": [""]}, "stop"),
])
def test_bad_arguments_raise_eagerly(model, kwargs, word, stream):
    with pytest.raises(ArgumentError, match=word):
        generate(model, PROMPT, stream=stream, **kwargs)  # raising here, not at the first next()


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_longer_than_context_raises_eagerly(small_ctx_model, stream):
    m = small_ctx_model
    prompt = "word " * 40
    assert len(m.encode(prompt)) >= m.n_ctx
    with pytest.raises(ArgumentError, match="context"):
        generate(m, prompt, max_tokens=4, stream=stream)
    with pytest.raises(ArgumentError, match="context"):
        run(m, prompt, max_tokens=4)
    # one position short of the context still fits: the token sampled from the prefill fills the last
    # position, and one more is sampled from its logits
    ids = m.encode(prompt)[: m.n_ctx - 1]
    res = GenerationResult()
    list(generate_events(m, ids, SamplingParams(), 4, (), res))
    assert res.stop_reason in ("context", "eos")
    if res.stop_reason == "context":
        assert len(res.token_ids) == 2
    with pytest.raises(ArgumentError, match="context"):
        list(generate_events(m, m.encode(prompt)[: m.n_ctx], SamplingParams(), 4))


# -- KV cache correctness ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def seq(model) -> tuple[list[int], np.ndarray]:
    ids = model.encode("The quick brown fox jumps over the lazy dog. " * 2 + "Numba compiles Python to")
    full = model.logits(ids)
    return ids, full


def assert_close(a: np.ndarray, b: np.ndarray, where: str) -> None:
    assert cosine(a, b) > 0.99999, where
    assert int(np.argmax(a)) == int(np.argmax(b)), where


def test_logits_shape_and_fresh_cache(model, seq):
    ids, full = seq
    assert full.shape == (len(ids), model.config.n_vocab) and full.dtype == np.float32
    assert np.isfinite(full).all()
    assert model.n_past == 0  # logits() leaves a fresh cache
    again = model.logits(ids)
    np.testing.assert_array_equal(again, full)


@pytest.mark.parametrize("k", [1, 6])
def test_prefill_then_decode_matches_full_logits(model, seq, k):
    ids, full = seq
    T = len(ids)
    model.reset()
    last = model.eval(ids[:-k], n_logits=1)
    assert last.shape == (1, model.config.n_vocab)
    assert_close(last[-1], full[T - k - 1], f"prefill of {T - k}")
    for i in range(T - k, T):
        row = model.eval([ids[i]], n_logits=1)[-1]
        assert_close(row, full[i], f"decode position {i}")
    assert model.n_past == T
    model.reset()


def test_chunked_prefill_matches_full_logits(model, seq):
    ids, full = seq
    model.reset()
    rows = []
    for a in range(0, len(ids), 7):
        chunk = ids[a:a + 7]
        rows.append(model.eval(chunk, n_logits=len(chunk)))
    model.reset()
    got = np.concatenate(rows)
    for i in range(len(ids)):
        assert_close(got[i], full[i], f"chunked position {i}")


def test_eval_rejects_overflowing_context(small_ctx_model):
    m = small_ctx_model
    m.reset()
    m.eval(list(range(10, 10 + m.n_ctx)), n_logits=0)
    with pytest.raises(ArgumentError, match="context"):
        m.eval([5])
    m.reset()
    with pytest.raises(ArgumentError):
        m.eval([m.config.n_vocab])
    with pytest.raises(ArgumentError):
        m.eval([])
