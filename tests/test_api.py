"""The llama-cpp-python-style Python API: message lists and system=, min_p (against a NumPy oracle of
llama.cpp's definition), logprobs (against log_softmax of model.logits), the prefix-reusing KV cache
(prefill counts, same tokens and logprobs as a fresh cache), create_chat_completion's OpenAI shapes, and
Model as a context manager."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import apr_numba
from apr_numba.errors import ArgumentError
from apr_numba.generation.generate import generate, prompt_ids, run
from apr_numba.generation.sampling import Sampler, SamplingParams
from apr_numba.model.decoder import load

ROOT = Path(__file__).resolve().parent.parent
SMOLLM = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
needs_model = pytest.mark.skipif(not SMOLLM.is_file(), reason=f"needs {SMOLLM.name}")


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


@pytest.fixture(scope="module")
def model():
    return load(SMOLLM, n_ctx=512)


# -- min_p: a NumPy oracle of llama.cpp's llama_sampler_min_p ----------------------------------------------------

def min_p_oracle(x, min_p, temperature, top_k=0):
    """llama.cpp's chain top_k -> min_p -> temperature -> softmax, written from the definitions."""
    x = np.asarray(x, np.float64)
    keep = np.ones(x.size, bool)
    if top_k:
        keep &= x >= np.sort(x)[-top_k]
    p0 = np.exp(x - x.max())  # untempered; the normalisation cancels in p_i >= min_p * p_max
    keep &= p0 >= min_p * p0.max()
    q = np.where(keep, np.exp((x - x.max()) / temperature), 0.0)
    return q / q.sum()


@pytest.mark.parametrize("vocab", [1000, 49152])
@pytest.mark.parametrize("min_p,temperature,top_k", [(0.05, 1.0, 0), (0.2, 0.7, 0), (0.01, 1.3, 40), (1.0, 1.0, 0)])
def test_min_p_matches_oracle(vocab, min_p, temperature, top_k):
    rng = np.random.default_rng(vocab + int(min_p * 100))
    x = (rng.standard_normal(vocab) * 3).astype(np.float32)
    ids, p = Sampler(SamplingParams(temperature=temperature, min_p=min_p, top_k=top_k)).distribution(x)
    ref = min_p_oracle(x, min_p, temperature, top_k)
    assert set(ids.tolist()) == set(np.flatnonzero(ref).tolist())
    np.testing.assert_allclose(p, ref[ids], rtol=1e-9, atol=1e-12)
    # draws only from the kept set
    s = Sampler(SamplingParams(temperature=temperature, min_p=min_p, top_k=top_k, seed=3))
    drawn = {s.sample(x) for _ in range(200)}
    assert drawn <= set(np.flatnonzero(ref).tolist())


def test_min_p_validated():
    with pytest.raises(ArgumentError, match="min_p"):
        SamplingParams(min_p=1.5).validate()


# -- messages and system= ----------------------------------------------------------------------------------------

@needs_model
def test_messages_render_the_chat_template(model):
    q = "What is the capital of France?"
    ids = prompt_ids(model, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}])
    # SmolLM2's ChatML template, written out by hand
    text = f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
    assert ids == model.encode(text)
    assert prompt_ids(model, q, system="Be brief.") == ids
    a = generate(model, [{"role": "user", "content": q}], max_tokens=12)
    assert a == generate(model, q, chat=True, max_tokens=12, reuse_cache=False)
    assert generate(model, [{"role": "user", "content": q}], system="Be brief.", max_tokens=12) == \
        generate(model, text, max_tokens=12, reuse_cache=False)


@needs_model
def test_bad_messages_are_argument_errors(model):
    with pytest.raises(ArgumentError, match="messages\\[0\\]"):
        generate(model, [{"role": "user"}])
    with pytest.raises(ArgumentError, match="string or a list"):
        generate(model, 42)


# -- logprobs ----------------------------------------------------------------------------------------------------

@needs_model
def test_logprobs_match_log_softmax_of_logits(model):
    prompt = "The capital of France is"
    res = run(model, prompt, max_tokens=8, logprobs=True, top_logprobs=3, reuse_cache=False)
    ids = res.prompt_token_ids + res.token_ids
    ref = model.logits(ids)  # full-sequence logits, fresh cache
    n0 = len(res.prompt_token_ids)
    assert len(res.logprobs) == len(res.token_ids) > 0
    for i, lp in enumerate(res.logprobs):
        ls = np_log_softmax(ref[n0 - 1 + i])
        assert lp["token_id"] == res.token_ids[i]
        assert lp["logprob"] == pytest.approx(ls[res.token_ids[i]], abs=2e-3)
        top = lp["top_logprobs"]
        assert [t for t, _ in top] == list(np.argsort(-ls, kind="stable")[:3])
        np.testing.assert_allclose([v for _, v in top], np.sort(ls)[::-1][:3], atol=2e-3)
        assert top[0][1] >= lp["logprob"] - 1e-9  # greedy: the sampled token is the top one
        assert top[0][0] == res.token_ids[i]


# -- prefix-reusing KV cache -------------------------------------------------------------------------------------

def lcp(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@needs_model
def test_prefix_reuse_prefills_only_the_suffix(model):
    model.reset()
    p1 = "Alice and Bob went to the market to buy apples, pears and"
    r1 = run(model, p1, max_tokens=8, logprobs=True)
    assert r1.n_reused == 0 and r1.n_prefilled == len(r1.prompt_token_ids)
    p2 = p1 + r1.text + " Then they walked home."
    r2 = run(model, p2, max_tokens=8, logprobs=True)
    cached = r1.prompt_token_ids + r1.token_ids[:-1]  # the last sampled token was never evaluated
    ids2 = model.encode(p2)
    expect = min(lcp(cached, ids2), len(ids2) - 1)
    assert expect > len(r1.prompt_token_ids)  # the extension really shares the first turn
    assert (r2.n_reused, r2.n_prefilled) == (expect, len(ids2) - expect)
    fresh = run(model, p2, max_tokens=8, logprobs=True, reuse_cache=False)
    assert fresh.n_reused == 0
    assert r2.token_ids == fresh.token_ids
    np.testing.assert_allclose([d["logprob"] for d in r2.logprobs], [d["logprob"] for d in fresh.logprobs], atol=2e-3)


@needs_model
def test_divergent_prompt_truncates_to_common_prefix(model):
    model.reset()
    a = "The three primary colors are red, blue and"
    b = "The three primary colors of light are"
    run(model, a, max_tokens=4)
    rb = run(model, b, max_tokens=6)
    expect = lcp(model.encode(a), model.encode(b))
    assert 0 < expect < len(model.encode(b))
    assert rb.n_reused == expect
    fresh = run(model, b, max_tokens=6, reuse_cache=False)
    assert rb.token_ids == fresh.token_ids
    # the same prompt again: everything but its last token comes from the cache
    again = run(model, b, max_tokens=6)
    assert again.n_prefilled == 1 and again.token_ids == fresh.token_ids


# -- create_chat_completion / create_completion ------------------------------------------------------------------

@needs_model
def test_create_chat_completion_shapes(model):
    msgs = [{"role": "user", "content": "Say hello."}]
    out = apr_numba.create_chat_completion(model, msgs, max_tokens=10, logprobs=True, top_logprobs=2)
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    ch = out["choices"][0]
    assert ch["message"]["role"] == "assistant"
    assert ch["message"]["content"] == generate(model, msgs, max_tokens=10, reuse_cache=False)
    assert ch["finish_reason"] in ("stop", "length")
    n_prompt = len(prompt_ids(model, msgs))
    u = out["usage"]
    assert u["prompt_tokens"] == n_prompt and u["total_tokens"] == n_prompt + u["completion_tokens"]
    content = ch["logprobs"]["content"]
    assert len(content) == u["completion_tokens"]
    assert all(len(c["top_logprobs"]) == 2 and c["logprob"] <= 0 for c in content)
    assert "".join(bytes(c["bytes"]).decode("utf-8", "replace") for c in content) == ch["message"]["content"]
    chunks = list(apr_numba.create_chat_completion(model, msgs, max_tokens=10, stream=True))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == ch["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == ch["finish_reason"]
    comp = apr_numba.create_completion(model, "The capital of France is", max_tokens=6)
    assert comp["object"] == "text_completion"
    assert comp["choices"][0]["text"] == generate(model, "The capital of France is", max_tokens=6)
    assert comp["usage"]["completion_tokens"] <= 6


@needs_model
def test_model_context_manager():
    with load(SMOLLM, n_ctx=64) as m:
        assert generate(m, "Hi", max_tokens=2) is not None
    assert m.state is None


def test_second_turn_uses_the_first_through_the_kv_cache():
    """A two-turn chat on qwen2.5-coder-0.5b-instruct, greedy: turn two reuses turn one's KV cache and its answer
    uses what turn one said (the model's own greedy output, checked by the fact it names, not copied)."""
    from apr_numba.model.decoder import load

    m = load("qwen2.5-coder-0.5b", backend="cpu", n_ctx=512)
    msgs = [{"role": "user", "content": "My name is Ada."}]
    first = apr_numba.generate(m, msgs, max_tokens=24)
    msgs += [{"role": "assistant", "content": first}, {"role": "user", "content": "What is my name?"}]
    res = apr_numba.run(m, msgs, max_tokens=24)
    assert "Ada" in res.text
    assert res.n_reused > 0 and 0 < res.n_prefilled < res.n_reused
