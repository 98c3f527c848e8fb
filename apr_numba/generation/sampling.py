"""Token sampling from a logits vector, and stop-string detection for streamed text.

The pipeline follows the semantics of Hugging Face transformers' logits processors and warpers
(``transformers/generation/logits_process.py``), applied in the order ``generate()`` applies them:

1. :class:`RepetitionPenaltyLogitsProcessor` -- over the distinct token ids of the last
   ``repeat_last_n`` history tokens (0 = the whole history; the window is llama.cpp's addition),
   a positive logit is divided by ``repeat_penalty`` and a negative one multiplied by it.
2. ``temperature == 0`` -> greedy decoding: ``argmax`` of the penalized logits (lowest index on ties,
   like ``np.argmax``); nothing below applies and no random number is drawn.
3. :class:`TemperatureLogitsWarper` -- logits / temperature.
4. :class:`TopKLogitsWarper` -- keep the tokens whose logit is >= the ``top_k``-th largest logit
   (ties with the k-th value are all kept, as HF does); ``top_k == 0`` disables it.
5. :class:`TopPLogitsWarper` -- over the softmax of the tokens kept so far, keep the smallest
   highest-probability prefix whose cumulative probability is >= ``top_p`` (always at least one
   token: HF's ``min_tokens_to_keep=1``); ``top_p == 1`` disables it. Tokens of equal logit are
   ranked by lower index first.
5b. min-p (llama.cpp's ``llama_sampler_min_p``, which runs after top-k / top-p and before the
   temperature): keep the tokens with ``p_i >= min_p * p_max`` of the untempered softmax, i.e.
   ``logit_i >= logit_max + log(min_p)``; ``min_p == 0`` disables it. The arg-max is always kept.
6. Softmax over the kept tokens (max subtracted, float64), then one draw by inverse CDF from the
   sampler's own ``np.random.Generator(PCG64(seed))``.

Cost is kept low for large vocabularies (152k) by never sorting the vocabulary: the k-th largest
logit is found by partitioning only the candidates above a threshold estimated from a strided
sample of the logits (falling back to a full ``np.partition`` when the estimate is off); the top-p
nucleus is bracketed between two logit values estimated from a sorted sample, checked against the
exact masses, and only the tokens between them are searched further (:func:`_nucleus_cut`); the draw
over a full vocabulary is two-level (block sums, then one block). :meth:`Sampler.distribution`
returns the exact distribution that :meth:`Sampler.sample` draws from, for tests and logging.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from apr_numba.errors import ArgumentError

__all__ = ["SamplingParams", "Sampler", "StopChecker"]

# Stride of the sample used to estimate the top-k threshold, and the vocabulary size from which
# the estimate pays off over a plain np.partition.
_SAMPLE_STRIDE = 64
_SAMPLE_MIN_VOCAB = 8192
# Block size of the two-level inverse-CDF draw over a full vocabulary (avoids a 152k cumsum).
_DRAW_BLOCK = 4096
# Largest input the top-p search sorts outright; larger ones are bracketed from a sample first.
_NUCLEUS_SORT_MAX = 4096


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; the defaults give greedy decoding with no penalty.

    ``temperature`` 0 = greedy; ``top_k`` 0 = off; ``top_p`` 1.0 = off; ``repeat_penalty`` 1.0 =
    off; ``repeat_last_n`` 0 = penalize over the whole history; ``seed`` None = fresh OS entropy.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    min_p: float = 0.0

    def validate(self) -> None:
        """Raise :class:`ArgumentError` naming the first out-of-range argument."""
        if not (self.temperature >= 0.0 and np.isfinite(self.temperature)):
            raise ArgumentError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ArgumentError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ArgumentError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (self.repeat_penalty > 0.0 and np.isfinite(self.repeat_penalty)):
            raise ArgumentError(f"repeat_penalty must be a finite number > 0, got {self.repeat_penalty!r}")
        if not _is_int(self.repeat_last_n) or self.repeat_last_n < 0:
            raise ArgumentError(f"repeat_last_n must be an integer >= 0, got {self.repeat_last_n!r}")
        if not (0.0 <= self.min_p <= 1.0):
            raise ArgumentError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise ArgumentError(f"seed must be an integer >= 0 or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _top_k_candidates(x: np.ndarray, k: int) -> np.ndarray:
    """Ascending indices of every i with ``x[i] >= `` the k-th largest value of ``x`` (ties kept).

    HF TopKLogitsWarper removes ``scores < topk(scores, k)[..., -1]``, so this is its kept set.
    """
    n = x.size
    if k >= n:
        return np.arange(n)
    if n >= _SAMPLE_MIN_VOCAB and k * 16 <= n:
        # Estimate a threshold t below the k-th largest value from a strided sample: the j-th
        # largest of the sample has about j * stride values of x above it. Correct whenever at
        # least k values are >= t (then the k-th largest is >= t); otherwise fall back.
        sample = x[::_SAMPLE_STRIDE]
        j = min(sample.size, (3 * k) // (2 * _SAMPLE_STRIDE) + 16)
        t = np.partition(sample, sample.size - j)[sample.size - j]
        cand = np.flatnonzero(x >= t)
        if cand.size >= k:
            vals = x[cand]
            kth = np.partition(vals, vals.size - k)[vals.size - k]
            return cand[vals >= kth]
    kth = np.partition(x, n - k)[n - k]
    return np.flatnonzero(x >= kth)


def _rank(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``idx`` (ascending) reordered by descending ``x``, lower index first on ties."""
    return idx[np.argsort(-x[idx], kind="stable")]


def _nucleus_len(p_sorted: np.ndarray, threshold: float) -> int:
    """Length of the smallest prefix of ``p_sorted`` (descending) with cumulative mass >= threshold.

    Token i is kept iff the mass strictly before it is < threshold (HF TopPLogitsWarper removes a
    token when the ascending cumulative probability up to it is <= 1 - top_p); at least 1 kept.
    """
    cum = np.cumsum(p_sorted)
    return 1 + int(np.searchsorted(cum[:-1], threshold, side="left"))


def _masked_sum(
    p: np.ndarray, x: np.ndarray, strict: bool, t: float, dense: bool, tmp: np.ndarray, mask: np.ndarray
) -> tuple[float, np.ndarray | None]:
    """Sum of ``p`` where ``x > t`` (strict) or ``x >= t``, and the indices when not ``dense``.

    ``dense`` says the set is expected to be large: then a masked multiply beats index lists.
    ``tmp`` and ``mask`` are scratch of ``x.size``.
    """
    (np.greater if strict else np.greater_equal)(x, t, out=mask)
    if dense:
        return float(np.multiply(p, mask, out=tmp).sum()), None
    idx = np.flatnonzero(mask)
    return float(p[idx].sum()), idx


def _nucleus_cut(
    x: np.ndarray,
    p: np.ndarray,
    threshold: float,
    total: float,
    tmp: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> tuple[float, int]:
    """The top-p nucleus of ``x`` as a cut ``(v, j)``: every token with ``x > v`` plus the first
    ``j`` tokens (by index) with ``x == v``.

    The nucleus is the smallest prefix of the ranking (descending x, lower index first on ties)
    whose mass of ``p`` (a non-decreasing function of x, summing to ``total``) is >= threshold.
    Small inputs are sorted. Large ones are bracketed by two values of x estimated from a sorted
    strided sample: everything above the upper value is kept (checked: its mass is < threshold),
    everything below the lower value dropped (checked: the mass at or above it is >= threshold),
    and the search recurses into the tokens between the two. When a check fails the recursion
    goes into the side that must hold the boundary instead, so every level shrinks the input.
    A tie group of x never straddles the subsets, so the cut found in a subset is the global one.
    ``tmp`` (float64) and ``mask`` (bool), at least ``x.size`` long, are optional scratch.
    """
    n = x.size
    if n <= _NUCLEUS_SORT_MAX:
        ids = _rank(x, np.arange(n))
        keep = _nucleus_len(p[ids], threshold)
        v = x[ids[keep - 1]]
        return float(v), int(np.count_nonzero(x[ids[:keep]] == v))
    if tmp is None or mask is None or tmp.size < n or mask.size < n:
        tmp, mask = np.empty(n), np.empty(n, dtype=bool)
    tmp, mask = tmp[:n], mask[:n]
    stride = n // (_NUCLEUS_SORT_MAX // 2)
    xs = np.sort(x[::stride])[::-1]
    ps = np.sort(p[::stride])[::-1]  # aligned with xs: p is monotone in x
    est = np.cumsum(ps)
    r = 0
    if est[-1] > 0.0:  # (a sample of masked -inf logits says nothing)
        est *= total / est[-1]  # estimated mass at or above each sample value
        r = min(int(np.searchsorted(est, threshold, side="left")), xs.size - 1)
    d = int(4.0 * np.sqrt(r + 1.0)) + 8
    hi_t = xs[r - d] if r >= d else np.inf
    lo_t = xs[r + d] if r + d < xs.size else -np.inf
    m_above, above = _masked_sum(p, x, True, hi_t, (r - d) * 8 > xs.size, tmp, mask)
    if m_above >= threshold:  # estimate too low: the nucleus lies within `above`
        if above is None:
            above = np.flatnonzero(x > hi_t)
        return _nucleus_cut(x[above], p[above], threshold, m_above, tmp, mask)
    m_lo = _masked_sum(p, x, False, lo_t, True, tmp, mask)[0] if lo_t > -np.inf else total
    if m_lo < threshold:  # estimate too high: all of x >= lo_t is kept
        below = np.flatnonzero(x < lo_t)
        if below.size == 0:  # (rounding) keep everything
            v = x.min()
            return float(v), int(np.count_nonzero(x == v))
        return _nucleus_cut(x[below], p[below], threshold - m_lo, total - m_lo, tmp, mask)
    np.greater_equal(x, lo_t, out=mask)
    mask &= x <= hi_t
    mid = np.flatnonzero(mask)
    if mid.size == n:  # no progress (e.g. all logits equal): sort everything
        ids = _rank(x, mid)
        keep = _nucleus_len(p[ids], threshold)
        v = x[ids[keep - 1]]
        return float(v), int(np.count_nonzero(x[ids[:keep]] == v))
    return _nucleus_cut(x[mid], p[mid], threshold - m_above, m_lo - m_above, tmp, mask)


def _cut_mask(x: np.ndarray, cut: tuple[float, int], out: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of the tokens kept by a :func:`_nucleus_cut` cut."""
    v, j = cut
    mask = np.greater(x, v, out=out)
    ties = np.flatnonzero(x == v)
    mask[ties[:j]] = True
    return mask


def _nucleus(x: np.ndarray, p: np.ndarray, threshold: float, total: float) -> np.ndarray:
    """Ascending indices of the top-p nucleus of ``x`` (see :func:`_nucleus_cut`)."""
    return np.flatnonzero(_cut_mask(x, _nucleus_cut(x, p, threshold, total)))


class Sampler:
    """Draws token ids from logits under fixed :class:`SamplingParams`.

    Each sampler owns ``np.random.Generator(PCG64(seed))``: two samplers with the same seed fed the
    same logits give the same tokens. Greedy sampling draws no random numbers. Not thread-safe
    (the generator and the vocab-sized scratch buffers are per instance).
    """

    def __init__(self, params: SamplingParams):
        params.validate()
        self.params = params
        self.rng = np.random.Generator(np.random.PCG64(params.seed))
        # Vocab-sized scratch reused across calls: fresh 1 MB temporaries cost page faults each call.
        self._f64 = np.empty(0)
        self._f64b = np.empty(0)
        self._mask = np.empty(0, dtype=bool)

    def _scratch(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._f64.size < n:
            self._f64, self._f64b, self._mask = np.empty(n), np.empty(n), np.empty(n, dtype=bool)
        return self._f64[:n], self._f64b[:n], self._mask[:n]

    # -- pipeline pieces -----------------------------------------------------------------------

    def _penalized(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        x = np.asarray(logits)
        if x.ndim != 1 or x.size == 0:
            raise ArgumentError(f"logits must be a non-empty 1-D array, got shape {x.shape}")
        if x.dtype != np.float32 and x.dtype != np.float64:
            x = x.astype(np.float32)
        pen = self.params.repeat_penalty
        if pen == 1.0 or len(history) == 0:
            return x
        n_last = self.params.repeat_last_n
        window = history[-n_last:] if n_last else history
        ids = np.unique(np.asarray(window, dtype=np.int64))
        if ids.size and (ids[0] < 0 or ids[-1] >= x.size):
            raise ArgumentError(f"history token ids must be in [0, {x.size}), got {ids[0]}..{ids[-1]}")
        x = x.copy()  # never modify the caller's logits
        v = x[ids]
        x[ids] = np.where(v < 0, v * pen, v / pen)
        return x

    def _distribution(self, x: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
        """(ids, unnormalized float64 probs, keep) after temperature/top-k/top-p.

        ids None = probs over the whole vocabulary (then ``keep``, if not None, masks the top-p
        nucleus, and probs outside it are 0); else ids are the kept tokens in no particular order
        (drawing does not need one; :meth:`distribution` sorts). Probs may live in scratch memory
        that the next call overwrites.
        """
        p_ = self.params
        n = x.size
        m = x.max()
        if not np.isfinite(m):
            raise ArgumentError("logits contain NaN or +inf, or are all -inf")
        t = p_.temperature
        # min-p on the untempered logits: p_i >= min_p * p_max  <=>  x_i >= max + log(min_p)
        floor = float(m) + float(np.log(p_.min_p)) if p_.min_p > 0.0 else -np.inf
        if 0 < p_.top_k < n:
            ids = _top_k_candidates(x, p_.top_k)
            p = np.exp((x[ids].astype(np.float64) - float(m)) / t)
            if p_.top_p < 1.0:
                total = float(p.sum())
                keep = _nucleus(x[ids], p, p_.top_p * total, total)
                ids, p = ids[keep], p[keep]
            if floor > -np.inf:
                keep = x[ids] >= floor
                ids, p = ids[keep], p[keep]
            return ids, p, None
        z, tmp, mask = self._scratch(n)
        np.subtract(x, m, out=z, dtype=np.float64)
        z /= t
        p = np.exp(z, out=z)
        if p_.top_p >= 1.0 and floor == -np.inf:
            return None, p, None
        if p_.top_p < 1.0:
            total = float(p.sum())
            keep = _cut_mask(x, _nucleus_cut(x, p, p_.top_p * total, total, tmp, mask), mask)
            if floor > -np.inf:
                keep &= x >= floor
        else:
            keep = np.greater_equal(x, floor, out=mask)
        p *= keep  # a full-vocab draw over the kept set is cheaper than gathering it
        return None, p, keep

    def _draw(self, p: np.ndarray) -> int:
        """Inverse-CDF draw of an index of ``p`` (unnormalized, >= 0, some > 0)."""
        u = self.rng.random()
        base = 0
        if p.size > _DRAW_BLOCK:  # two levels (block sums, then one block) to avoid a 152k cumsum
            starts = np.arange(0, p.size, _DRAW_BLOCK)
            bcdf = np.cumsum(np.add.reduceat(p, starts))
            r = u * bcdf[-1]
            b = min(int(np.searchsorted(bcdf, r, side="right")), starts.size - 1)
            while b > 0 and bcdf[b] == bcdf[b - 1]:  # rounding landed on an empty block
                b -= 1
            base = int(starts[b])
            p = p[base : base + _DRAW_BLOCK]
            cdf = np.cumsum(p)
            r = r - bcdf[b - 1] if b else r
        else:
            cdf = np.cumsum(p)
            r = u * cdf[-1]
        i = min(int(np.searchsorted(cdf, r, side="right")), p.size - 1)
        while i > 0 and p[i] == 0.0:  # rounding went past the last non-zero entry
            i -= 1
        return base + i

    # -- public API ----------------------------------------------------------------------------

    def distribution(self, logits: np.ndarray, history: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """The distribution :meth:`sample` draws from: (token ids, probabilities summing to 1).

        Ids are ordered by descending probability (lower id first on ties) when top-k or top-p
        cut the vocabulary, else they are ``arange(vocab)``. Greedy gives ``([argmax], [1.0])``.
        """
        x = self._penalized(logits, history)
        if self.params.greedy:
            return np.array([self._argmax(x)]), np.ones(1)
        ids, p, keep = self._distribution(x)
        if ids is None:
            ids = np.arange(x.size) if keep is None else np.flatnonzero(keep)
            p = p[ids]
        order = np.lexsort((ids, -x[ids]))  # descending logit, lower id first on ties
        return ids[order], p[order] / p.sum()

    @staticmethod
    def _argmax(x: np.ndarray) -> int:
        i = int(np.argmax(x))
        if np.isnan(x[i]):
            raise ArgumentError("logits contain NaN")
        return i

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """Pick the next token id from ``logits`` (float32 ``(vocab,)``, not modified).

        ``history`` is the token ids seen so far (prompt + generated), used by the repetition
        penalty only.
        """
        x = self._penalized(logits, history)
        if self.params.greedy:
            return self._argmax(x)
        ids, p, _ = self._distribution(x)
        i = self._draw(p)
        return i if ids is None else int(ids[i])


class StopChecker:
    """Detects stop strings in streamed text without ever emitting part of one.

    :meth:`feed` returns the text that is safe to print now -- it holds back the longest tail that
    could still be the start of a stop string -- and whether a stop string was hit. On a hit the
    text before the stop string is returned, the stop string and anything after it are dropped, and
    later feeds return ``("", True)``. :meth:`flush` returns the held-back tail at end of stream.
    """

    def __init__(self, stop: Sequence[str]):
        if isinstance(stop, str):
            stop = [stop]
        stops = list(stop)
        if any(not isinstance(s, str) or not s for s in stops):
            raise ArgumentError(f"stop strings must be non-empty strings, got {stops!r}")
        self.stops = tuple(dict.fromkeys(stops))
        self._prefixes = {s[:i] for s in self.stops for i in range(1, len(s))}
        self._max_hold = max((len(s) - 1 for s in self.stops), default=0)
        self._buf = ""
        self.hit: str | None = None

    def feed(self, text_piece: str) -> tuple[str, bool]:
        if self.hit is not None:
            return "", True
        buf = self._buf + text_piece
        # The stop string that completes first wins (the longest one if several end together), so
        # the result does not depend on how the text is split into pieces.
        best: tuple[int, int] | None = None
        for s in self.stops:
            pos = buf.find(s)
            if pos >= 0 and (best is None or (pos + len(s), pos) < best):
                best, self.hit = (pos + len(s), pos), s
        if best is not None:
            self._buf = ""
            return buf[: best[1]], True
        hold = 0
        for n in range(min(self._max_hold, len(buf)), 0, -1):
            if buf[-n:] in self._prefixes:
                hold = n
                break
        self._buf = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """End of stream: return the held-back text (no stop string can complete any more)."""
        out, self._buf = self._buf, ""
        return out
