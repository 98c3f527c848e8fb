"""Tests of apr_numba.generation.sampling against naive, obviously-correct references written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apr_numba.errors import ArgumentError
from apr_numba.generation.sampling import Sampler, SamplingParams, StopChecker, _nucleus, _top_k_candidates

# ---------------------------------------------------------------------------------------------
# Naive references (full sorts and Python loops).


def naive_penalty(logits, history, penalty, last_n):
    """HF RepetitionPenaltyLogitsProcessor over the distinct ids of the last-n window."""
    out = [float(v) for v in logits]
    window = list(history)[-last_n:] if last_n else list(history)
    for t in set(window):
        out[t] = out[t] * penalty if out[t] < 0 else out[t] / penalty
    return np.array(out)


def naive_order(x):
    """All ids by descending logit, lower id first on ties (a full sort)."""
    return sorted(range(len(x)), key=lambda i: (-float(x[i]), i))


def naive_dist(x, temperature, top_k=0, top_p=1.0, order=None):
    """{id: prob} after temperature -> top-k (ties kept) -> top-p (>=1 kept) -> softmax."""
    order = naive_order(x) if order is None else order
    kept = order
    if 0 < top_k < len(x):
        kth = float(x[order[top_k - 1]])
        kept = [i for i in order if float(x[i]) >= kth]
    z = [float(x[i]) / temperature for i in kept]
    m = max(z)
    w = [math.exp(v - m) for v in z]
    total = sum(w)
    probs = [v / total for v in w]
    if top_p < 1.0:
        nucleus, acc = [], 0.0
        for i, p in zip(kept, probs, strict=True):
            if nucleus and acc >= top_p:
                break
            nucleus.append((i, p))
            acc += p
        total = sum(p for _, p in nucleus)
        return {i: p / total for i, p in nucleus}
    return dict(zip(kept, probs, strict=True))


def naive_stop(text, stops):
    """(text before the first-completing stop string, hit) by scanning every end position."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            return text[: end - max(len(s) for s in ending)], True
    return text, False


def rand_logits(n, seed, scale=3.0):
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def dist_dict(sampler, logits, history=()):
    ids, p = sampler.distribution(logits, history)
    return {int(i): float(q) for i, q in zip(ids, p, strict=True)}


def assert_dist_equal(got, want):
    assert set(got) == set(want)
    for i in want:
        assert got[i] == pytest.approx(want[i], rel=1e-6, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Greedy and repetition penalty.


def test_greedy_is_argmax():
    for seed in range(5):
        x = rand_logits(1000, seed)
        s = Sampler(SamplingParams(temperature=0.0, top_k=5, top_p=0.5, seed=seed))
        assert s.sample(x) == int(np.argmax(x)) == naive_order(x)[0]


def test_greedy_ties_lowest_index():
    x = np.array([1.0, 3.0, 2.0, 3.0, 3.0], dtype=np.float32)
    assert Sampler(SamplingParams()).sample(x) == 1


def test_penalty_positive_negative_zero():
    x = np.array([2.0, -1.0, 0.0, 1.5, -3.0, 0.5], dtype=np.float32)
    hist = [0, 1, 2, 0, 0]  # duplicates are penalized once
    s = Sampler(SamplingParams(temperature=1.0, repeat_penalty=1.25))
    ids, p = s.distribution(x, hist)
    want = naive_penalty(x, hist, 1.25, 64)
    np.testing.assert_allclose(want[:3], [1.6, -1.25, 0.0])
    ref = naive_dist(want, 1.0)
    assert_dist_equal(dist_dict(s, x, hist), ref)
    # greedy sees the penalized logits: 2.0 / 1.25 = 1.6 > 1.5 still; with 1.5 penalty 1.33 < 1.5
    assert Sampler(SamplingParams(repeat_penalty=1.25)).sample(x, hist) == 0
    assert Sampler(SamplingParams(repeat_penalty=1.5)).sample(x, hist) == 3


def test_penalty_only_last_n_window():
    x = rand_logits(50, 1)
    hist = [3, 7, 11, 3, 20, 21, 22]
    for last_n in (0, 1, 3, 4, 100):
        s = Sampler(SamplingParams(temperature=0.9, repeat_penalty=1.7, repeat_last_n=last_n))
        ref = naive_dist(naive_penalty(x, hist, 1.7, last_n), 0.9)
        assert_dist_equal(dist_dict(s, x, hist), ref)
    # last 3 = {20, 21, 22}: 21 is penalized (5.5 -> 2.75), 7 is not; the whole history hits both
    x = np.zeros(30, dtype=np.float32)
    x[7], x[21] = 5.0, 5.5
    assert Sampler(SamplingParams(repeat_penalty=2.0, repeat_last_n=3)).sample(x, hist) == 7
    assert Sampler(SamplingParams(repeat_penalty=2.0, repeat_last_n=0)).sample(x, hist) == 21
    assert Sampler(SamplingParams(repeat_penalty=2.0)).sample(x, []) == 21


def test_penalty_numpy_history_and_float64_logits():
    x = rand_logits(40, 2).astype(np.float64)
    hist = np.array([1, 2, 3, 39])
    s = Sampler(SamplingParams(temperature=1.3, repeat_penalty=0.8, repeat_last_n=2))
    assert_dist_equal(dist_dict(s, x, hist), naive_dist(naive_penalty(x, hist, 0.8, 2), 1.3))


# ---------------------------------------------------------------------------------------------
# Warpers: distribution equals the naive reference.


@pytest.mark.parametrize("n", [7, 1000, 20000])
@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [
        (1.0, 0, 1.0),
        (0.8, 40, 0.9),
        (0.8, 0, 0.9),
        (1.5, 5, 1.0),
        (0.5, 3, 0.5),
        (2.0, 0, 0.3),
        (1.0, 1, 1.0),
    ],
)
def test_distribution_matches_naive(n, temperature, top_k, top_p):
    for seed in range(2):
        x = rand_logits(n, 100 + seed)
        hist = list(np.random.default_rng(seed).integers(0, n, 30))
        params = SamplingParams(temperature, top_k, top_p, repeat_penalty=1.1, repeat_last_n=16)
        ref = naive_dist(naive_penalty(x, hist, 1.1, 16).astype(np.float32), temperature, top_k, top_p)
        got = dist_dict(Sampler(params), x, hist)
        assert_dist_equal(got, ref)


def test_distribution_with_ties_and_masked():
    x = np.array([1.0, 2.0, 2.0, -np.inf, 2.0, 0.5, 1.0, -np.inf], dtype=np.float32)
    # top-k=2 keeps every token tied with the 2nd largest (HF TopKLogitsWarper semantics)
    assert_dist_equal(dist_dict(Sampler(SamplingParams(1.0, top_k=2)), x), naive_dist(x, 1.0, 2))
    assert set(dist_dict(Sampler(SamplingParams(1.0, top_k=2)), x)) == {1, 2, 4}
    # top-p among ties ranks lower ids first
    assert_dist_equal(dist_dict(Sampler(SamplingParams(1.0, top_p=0.5)), x), naive_dist(x, 1.0, 0, 0.5))
    assert set(dist_dict(Sampler(SamplingParams(1.0, top_p=0.5)), x)) == {1, 2}


def test_top_k_one_equals_greedy_at_any_temperature():
    for n in (10, 152064):
        x = rand_logits(n, 5)
        want = int(np.argmax(x))
        for t in (0.1, 0.8, 1.0, 5.0, 100.0):
            s = Sampler(SamplingParams(temperature=t, top_k=1, seed=1))
            assert all(s.sample(x) == want for _ in range(20))


def test_tiny_top_p_keeps_only_argmax():
    x = rand_logits(5000, 6, scale=0.1)  # nearly flat: the argmax alone has little mass
    s = Sampler(SamplingParams(temperature=3.0, top_p=1e-9, seed=2))
    ids, p = s.distribution(x)
    assert list(ids) == [int(np.argmax(x))] and p[0] == 1.0
    assert all(s.sample(x) == int(np.argmax(x)) for _ in range(50))


def test_top_k_candidates_adversarial():
    n = 20000
    rng = np.random.default_rng(3)
    cases = {
        "random": rand_logits(n, 7),
        "ascending": np.arange(n, dtype=np.float32),
        "descending": np.arange(n, dtype=np.float32)[::-1].copy(),
        "constant": np.zeros(n, dtype=np.float32),
        "few_values": rng.integers(0, 4, n).astype(np.float32),
        "masked": np.where(rng.random(n) < 0.99, -np.inf, rng.standard_normal(n)).astype(np.float32),
        "strided_peaks": np.where(np.arange(n) % 64 == 0, 10.0, rng.standard_normal(n)).astype(np.float32),
    }
    for name, x in cases.items():
        order = naive_order(x)
        for k in (1, 2, 40, 300, 1000, n - 1, n):
            kth = float(x[order[k - 1]])
            want = [i for i in range(n) if float(x[i]) >= kth]
            got = _top_k_candidates(x, k)
            assert got.tolist() == want, (name, k)


def adversarial_logits(n, seed):
    rng = np.random.default_rng(seed)
    peaked = rng.standard_normal(n)
    peaked[rng.integers(0, n, 5)] += 12.0
    return {
        "random": rand_logits(n, seed),
        "flat": rand_logits(n, seed, scale=0.05),
        "peaked": peaked.astype(np.float32),
        "heavy_tail": np.clip(rng.standard_cauchy(n), -50, 50).astype(np.float32),
        "ascending": np.linspace(-5, 5, n).astype(np.float32),
        "constant": np.zeros(n, dtype=np.float32),
        "few_values": rng.integers(0, 4, n).astype(np.float32),
        "masked": np.where(rng.random(n) < 0.99, -np.inf, rng.standard_normal(n)).astype(np.float32),
        "strided_peaks": np.where(np.arange(n) % 64 == 0, 3.0, rng.standard_normal(n)).astype(np.float32),
    }


@pytest.mark.parametrize("n", [3000, 30000])
def test_nucleus_adversarial(n):
    for name, x in adversarial_logits(n, n).items():
        order = naive_order(x)
        for temperature in (0.7, 2.0):
            m = float(x.max())
            p = np.exp((x.astype(np.float64) - m) / temperature)
            total = float(p.sum())
            for top_p in (1e-7, 0.0123457, 0.3141593, 0.9012718, 0.9990001):
                want = set(naive_dist(x, temperature, 0, top_p, order))
                got = _nucleus(x, p, top_p * total, total)
                assert len(set(got.tolist())) == got.size, (name, top_p)
                assert set(got.tolist()) == want, (name, temperature, top_p)


# ---------------------------------------------------------------------------------------------
# Draws: support, frequencies, seeds, no mutation.


def test_support_equals_kept_set():
    x = rand_logits(3000, 8, scale=0.5)
    for top_k, top_p in [(6, 1.0), (0, 0.004), (20, 0.3)]:
        s = Sampler(SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, seed=4))
        kept = set(naive_dist(x, 1.0, top_k, top_p))
        assert 2 <= len(kept) <= 20
        draws = {s.sample(x) for _ in range(3000)}
        assert draws == kept


def chi_square(counts, probs, draws):
    exp = np.asarray(probs) * draws
    return float(((np.asarray(counts) - exp) ** 2 / exp).sum())


# chi-square 0.999 quantiles for the degrees of freedom used below
CHI2_999 = {7: 24.32, 12: 32.91}


def test_frequencies_match_softmax():
    x = np.array([1.0, 0.2, -0.5, 2.0, 1.5, 0.0, -1.0, 0.7], dtype=np.float32)
    ref = naive_dist(x, 0.7)
    s = Sampler(SamplingParams(temperature=0.7, seed=123))
    draws = 40000
    counts = np.bincount([s.sample(x) for _ in range(draws)], minlength=8)
    assert chi_square(counts, [ref[i] for i in range(8)], draws) < CHI2_999[7]


def test_frequencies_full_vocab_blocked_draw():
    # Large vocab, no top-k/top-p: exercises the two-level draw; 12 heavy tokens spread over
    # blocks, the rest share the remaining mass as one bin.
    n = 20000
    x = np.full(n, -4.0, dtype=np.float32)
    heavy = np.linspace(5, n - 3, 12).astype(int)
    x[heavy] = np.linspace(3.0, 5.0, 12)
    ref = naive_dist(x, 1.0)
    probs = [ref[int(i)] for i in heavy]
    probs.append(1.0 - sum(probs))
    s = Sampler(SamplingParams(temperature=1.0, seed=9))
    draws = 12000
    samples = np.array([s.sample(x) for _ in range(draws)])
    counts = [int((samples == i).sum()) for i in heavy] + [int((~np.isin(samples, heavy)).sum())]
    assert chi_square(counts, probs, draws) < CHI2_999[12]

    # top-p nucleus spread over several blocks (the draw is over the masked full vocabulary)
    ref = naive_dist(x, 1.0, 0, 0.6)
    kept = sorted(ref)
    assert len(kept) >= 4 and kept[-1] - kept[0] > 4096
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.6, seed=10))
    draws = 4000
    samples = [s.sample(x) for _ in range(draws)]
    assert set(samples) == set(kept)
    counts = [samples.count(i) for i in kept]
    crit = len(kept) - 1 + 5 * math.sqrt(2 * (len(kept) - 1))
    assert chi_square(counts, [ref[i] for i in kept], draws) < crit


def test_frequencies_top_k_top_p():
    x = rand_logits(152064, 11)
    ref = naive_dist(x, 0.8, 40, 0.9)
    ids = sorted(ref)
    s = Sampler(SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=5))
    draws = 10000
    samples = [s.sample(x) for _ in range(draws)]
    assert set(samples) <= set(ids)
    counts = [samples.count(i) for i in ids]
    # pool tokens with small expected counts into one bin
    big = [j for j, i in enumerate(ids) if ref[i] * draws >= 20]
    small = [j for j in range(len(ids)) if j not in big]
    c = [counts[j] for j in big] + [sum(counts[j] for j in small)]
    p = [ref[ids[j]] for j in big] + [sum(ref[ids[j]] for j in small)]
    if not small:
        c, p = c[:-1], p[:-1]
    df = len(c) - 1
    assert chi_square(c, p, draws) < df + 5 * math.sqrt(2 * df)  # ~ far tail of chi2(df)


def test_same_seed_same_draws_different_seed_different():
    x = rand_logits(1000, 12, scale=0.3)
    p = SamplingParams(temperature=1.0, top_k=100, seed=42)
    a = [Sampler(p).sample(x) for _ in range(1)]
    s1, s2 = Sampler(p), Sampler(p)
    seq1 = [s1.sample(x) for _ in range(50)]
    seq2 = [s2.sample(x) for _ in range(50)]
    assert seq1 == seq2 and a[0] == seq1[0]
    s3 = Sampler(SamplingParams(temperature=1.0, top_k=100, seed=43))
    assert [s3.sample(x) for _ in range(50)] != seq1


def test_logits_and_history_unmodified():
    x = rand_logits(20000, 13)
    x_copy = x.copy()
    hist = [1, 2, 3, 4, 5]
    for params in [
        SamplingParams(repeat_penalty=1.3),
        SamplingParams(temperature=0.8, top_k=40, top_p=0.9, repeat_penalty=1.3, seed=1),
        SamplingParams(temperature=0.8, top_p=0.9, repeat_penalty=0.7, seed=1),
        SamplingParams(temperature=1.2, seed=1),
    ]:
        s = Sampler(params)
        s.sample(x, hist)
        s.distribution(x, hist)
        np.testing.assert_array_equal(x, x_copy)
        assert hist == [1, 2, 3, 4, 5]


def test_distribution_sums_to_one_and_is_sorted():
    x = rand_logits(5000, 14)
    ids, p = Sampler(SamplingParams(temperature=0.9, top_k=50, top_p=0.8)).distribution(x)
    assert p.sum() == pytest.approx(1.0)
    assert np.all(np.diff(x[ids]) <= 0) and np.all(np.diff(p) <= 1e-15)


# ---------------------------------------------------------------------------------------------
# Argument errors.


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"repeat_penalty": 0.0}, "repeat_penalty"),
        ({"repeat_penalty": -1.0}, "repeat_penalty"),
        ({"repeat_last_n": -1}, "repeat_last_n"),
        ({"seed": -3}, "seed"),
    ],
)
def test_invalid_params(kwargs, name):
    params = SamplingParams(**kwargs)
    with pytest.raises(ArgumentError, match=name):
        params.validate()
    with pytest.raises(ArgumentError, match=name):
        Sampler(params)


def test_valid_edge_params():
    SamplingParams(temperature=0.0, top_k=0, top_p=1.0, repeat_penalty=1.0, repeat_last_n=0).validate()
    SamplingParams(top_p=1e-12, repeat_penalty=1e-3, seed=0).validate()


def test_bad_logits_and_history():
    s = Sampler(SamplingParams(temperature=1.0, repeat_penalty=1.1))
    with pytest.raises(ArgumentError, match="logits"):
        s.sample(np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(ArgumentError, match="logits"):
        s.sample(np.zeros(0, dtype=np.float32))
    with pytest.raises(ArgumentError, match="logits"):
        s.sample(np.array([0.0, np.nan], dtype=np.float32))
    with pytest.raises(ArgumentError, match="logits"):
        s.sample(np.full(4, -np.inf, dtype=np.float32))
    with pytest.raises(ArgumentError, match="logits"):
        Sampler(SamplingParams()).sample(np.array([0.0, np.nan], dtype=np.float32))
    with pytest.raises(ArgumentError, match="history"):
        s.sample(np.zeros(4, dtype=np.float32), [1, 4])
    with pytest.raises(ArgumentError, match="history"):
        s.sample(np.zeros(4, dtype=np.float32), [-1])


# ---------------------------------------------------------------------------------------------
# StopChecker.


def run_stop(pieces, stops):
    sc = StopChecker(stops)
    out, hit = [], False
    for piece in pieces:
        text, hit = sc.feed(piece)
        out.append(text)
        if hit:
            break
    if not hit:
        out.append(sc.flush())
    return "".join(out), hit, out


def test_stop_split_across_pieces():
    text, hit, out = run_stop(["Hello <|im", "_e", "nd|> more"], ["<|im_end|>"])
    assert (text, hit) == ("Hello ", True)
    assert out == ["Hello ", "", ""]  # the partial stop string is never emitted


def test_stop_false_prefix_is_released():
    sc = StopChecker(["</s>"])
    assert sc.feed("a </") == ("a ", False)
    assert sc.feed("b>") == ("</b>", False)
    assert sc.feed("x <") == ("x ", False)
    assert sc.flush() == "<"  # no false hold at the end
    assert sc.flush() == ""


def test_stop_no_hold_without_prefix():
    sc = StopChecker(["STOP"])
    assert sc.feed("abc") == ("abc", False)
    assert sc.feed("S") == ("", False)
    assert sc.feed("TOP tail") == ("", True)
    assert sc.hit == "STOP"
    assert sc.feed("more") == ("", True)
    assert sc.flush() == ""


def test_stop_multiple_and_within_piece():
    assert run_stop(["abc\n\nUser: x"], ["User:", "\n\n"])[:2] == ("abc", True)
    # first *completing* stop wins, whatever the split
    for pieces in (["abcd"], list("abcd"), ["ab", "cd"]):
        assert run_stop(pieces, ["abcd", "bc"])[:2] == ("a", True)


def test_stop_errors():
    with pytest.raises(ArgumentError):
        StopChecker(["ok", ""])
    assert StopChecker([]).feed("anything") == ("anything", False)


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab<>/x", max_size=30),
    stops=st.lists(st.text(alphabet="ab<>/", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=8),
)
def test_stop_streaming_matches_naive(text, stops, cuts):
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    pieces = [text[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    got, hit, out = run_stop(pieces, stops)
    assert (got, hit) == naive_stop(text, stops)
    # no emitted prefix ever contains the start of the stop string that was hit later
    emitted = ""
    for o in out:
        emitted += o
        assert naive_stop(text, stops)[0].startswith(emitted)


def test_scratch_reuse_across_calls_and_vocab_sizes():
    s = Sampler(SamplingParams(temperature=0.9, top_p=0.8, seed=3))
    big, small = rand_logits(20000, 30), rand_logits(10, 31)
    ids, p = s.distribution(big)
    ids0, p0 = ids.copy(), p.copy()
    for x in (small, big, small, rand_logits(30000, 32)):
        s.sample(x)
        assert_dist_equal(dist_dict(s, x), naive_dist(x, 0.9, 0, 0.8))
    np.testing.assert_array_equal(ids, ids0)
    np.testing.assert_array_equal(p, p0)
