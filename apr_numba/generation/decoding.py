"""One sequence being generated, as a step machine: prefill (reusing a cached prefix), then sample / feed.

:class:`SequenceDecoder` is the single definition of "how a token is picked and when generation stops"
shared by :func:`apr_numba.generate.generate_events` (one sequence on the model's own KV cache) and the
server's scheduler (one per slot, each on its own KV state, stepped together). The forward itself is not
called here between tokens: the caller evaluates :attr:`SequenceDecoder.next_token` on the sequence's
state and hands the logits back with :meth:`SequenceDecoder.feed`, so several sequences can be stepped
by one batched call.

Prefix reuse (llama.cpp's ``llama_kv_cache_seq_rm`` past the common prefix, llama-cpp-python's
``Llama.eval`` with ``n_tokens`` kept): the state records the ids it holds (``KVState.tokens``); the
longest common prefix with the new prompt is kept, ``n_past`` is truncated to it and only the rest of the
prompt is prefilled. At least the last prompt token is always evaluated, to have its logits.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from apr_numba import runtime as _config
from apr_numba.errors import ArgumentError
from apr_numba.generation.sampling import Sampler, SamplingParams, StopChecker
from apr_numba.model.decoder import cached_tokens


@dataclass
class TokenEvent:
    """One generated token: id, the text it completes (may be "" mid UTF-8 sequence), its index,
    and the wall time since generation started (seconds).

    With logprobs on: ``logprob`` is ln p(token) under the model's raw softmax (before penalties,
    temperature or truncation, as OpenAI reports), ``top_logprobs`` the (id, logprob) pairs of the most
    likely tokens, best first. A final flush event (held-back text) has ``token_id == -1``.
    """

    token_id: int
    text: str
    index: int
    elapsed_s: float
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class GenerationResult:
    """What a finished generation produced and how fast.

    ``n_prefilled`` / ``n_reused``: prompt tokens evaluated / taken from the KV cache (prefix reuse).
    ``logprobs`` (when asked for): per generated token ``{"token_id", "logprob", "top_logprobs": [(id,
    logprob), ...]}``. ``stop_reason``: "eos" (end-of-generation token), "stop" (a stop string), "length" (max_tokens),
    "context" (KV cache full), or "cancelled". Rates are tokens per second of wall time.
    """

    text: str = ""
    prompt_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefill_tok_s: float = 0.0
    decode_tok_s: float = 0.0
    time_to_first_token_s: float = 0.0
    stop_reason: str = "length"
    n_prefilled: int = 0
    n_reused: int = 0
    logprobs: list[dict] = field(default_factory=list)
    threads: int = 0
    threading_layer: str = ""
    backend: str = "cpu"

    def to_dict(self) -> dict:
        return asdict(self)


def check_max_tokens(max_tokens) -> None:
    """Raise ArgumentError unless max_tokens is an integer >= 0."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 0:
        raise ArgumentError(f"max_tokens must be an integer >= 0, got {max_tokens!r}")


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x, y = np.asarray(a[:n], np.int64), np.asarray(b[:n], np.int64)
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-softmax of a 1-D logits vector (max subtracted)."""
    x = np.asarray(logits, np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


def token_logprobs(logits: np.ndarray, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """ln p(token) and the ``top`` most likely (id, ln p), best first (lower id first on ties)."""
    lp = log_softmax(logits)
    pairs: list[tuple[int, float]] = []
    if top > 0:
        k = min(int(top), lp.size)
        idx = np.argpartition(-lp, k - 1)[:k]
        idx = idx[np.lexsort((idx, -lp[idx]))]
        pairs = [(int(i), float(lp[i])) for i in idx]
    return float(lp[token]), pairs


class SequenceDecoder:
    """A generation in progress on one KV state.

    Use: ``start()`` (prefill), then loop ``events = sample()``; stop when ``done``; else evaluate
    ``next_token`` on ``state`` and ``feed(logits)``. ``cancel()`` ends it between steps. ``result`` (a
    :class:`~apr_numba.generate.GenerationResult`) is filled as it goes; ``prefilled`` / ``reused`` count
    the prompt tokens evaluated and taken from the cache.

    Raises (from the constructor): ArgumentError for max_tokens < 0, bad sampling parameters, a bad stop
    string, or a prompt that leaves no room to generate in the state's context.
    """

    def __init__(self, model, ids: Sequence[int], params: SamplingParams, max_tokens: int, stop=(),
                 state=None, result=None, logprobs: int | None = None, reuse: bool = True):
        check_max_tokens(max_tokens)
        params.validate()
        if logprobs is not None and not (0 <= int(logprobs) <= 20):
            raise ArgumentError(f"top_logprobs must be in [0, 20], got {logprobs!r}")
        self.model, self.params, self.max_tokens = model, params, int(max_tokens)
        self.state = model.state if state is None else state
        self.reuse, self.logprobs = reuse, logprobs
        self.res = result if result is not None else GenerationResult()
        self.res.prompt_token_ids = [int(i) for i in ids]
        self.res.threads, self.res.backend = model.threads, model.backend
        n_ctx = self.state.n_ctx
        if len(ids) >= n_ctx:
            raise ArgumentError(f"prompt of {len(ids)} tokens does not fit the context of {n_ctx} "
                                f"positions (at least one more is needed to generate)")
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        self.stopper = StopChecker(stops) if stops else None
        self.sampler = Sampler(params)
        self.dec = model.tokenizer.stream_decoder()
        self.eos = model.tokenizer.eos_ids
        self.history = list(self.res.prompt_token_ids)
        self.texts: list[str] = []
        self.logits: np.ndarray | None = None
        self.next_token: int | None = None
        self.done = False
        self.prefilled = self.reused = 0
        self.t0 = self.t1 = 0.0

    @property
    def result(self):
        return self.res

    def start(self) -> None:
        """Prefill the prompt (only the part past the common prefix with the cached tokens)."""
        ids, st, res = self.res.prompt_token_ids, self.state, self.res
        self.t0 = time.perf_counter()
        keep = common_prefix_len(cached_tokens(st), ids) if self.reuse else 0
        keep = min(keep, len(ids) - 1)
        st.n_past = keep
        self.reused, self.prefilled = keep, len(ids) - keep
        res.n_reused, res.n_prefilled = self.reused, self.prefilled
        if self.max_tokens == 0:
            self._finish("length")
            return
        self.logits = self.model.eval(ids[keep:], n_logits=1, state=st)[-1]
        self.t1 = time.perf_counter()
        res.prefill_s = self.t1 - self.t0
        res.prefill_tok_s = self.prefilled / res.prefill_s if res.prefill_s > 0 else 0.0
        res.threading_layer = _config.threading_layer()
        res.stop_reason = "length"

    def feed(self, logits: np.ndarray) -> None:
        """The logits (n_vocab,) of :attr:`next_token`, evaluated on :attr:`state`."""
        self.logits = logits

    def sample(self) -> list:
        """Pick the next token; returns the :class:`TokenEvent` s it produced (0..2: the token's text,
        and the held-back tail when the sequence finishes). Sets :attr:`next_token` or :attr:`done`."""
        res = self.res
        tok = self.sampler.sample(self.logits, self.history)
        n = len(res.token_ids)
        if n == 0:
            res.time_to_first_token_s = time.perf_counter() - self.t0
        if tok in self.eos:
            return self._finish("eos")
        lp, top = (token_logprobs(self.logits, tok, self.logprobs) if self.logprobs is not None else (None, []))
        self.history.append(tok)
        res.token_ids.append(tok)
        piece = self.dec.push(tok)
        hit = False
        if self.stopper is not None:
            piece, hit = self.stopper.feed(piece)
        self.texts.append(piece)
        res.text = "".join(self.texts)
        events = [TokenEvent(tok, piece, n, time.perf_counter() - self.t0, lp, top)]
        if hit:
            return events + self._finish("stop")
        if n + 1 >= self.max_tokens:
            return events + self._finish("length")
        if self.state.n_past >= self.state.n_ctx:
            return events + self._finish("context")
        self.next_token = tok
        return events

    def cancel(self) -> list:
        """End the sequence now (between steps); returns the flush event, if any."""
        return [] if self.done else self._finish("cancelled")

    def _finish(self, reason: str) -> list:
        res = self.res
        self.done, self.next_token = True, None
        res.stop_reason = reason
        events = []
        tail = self.dec.flush()
        if self.stopper is not None and reason != "stop":
            tail, _ = self.stopper.feed(tail)
            tail += self.stopper.flush()
        if tail:
            self.texts.append(tail)
            res.text = "".join(self.texts)
            events.append(TokenEvent(-1, tail, len(res.token_ids), time.perf_counter() - self.t0))
        if self.t1:
            res.decode_s = time.perf_counter() - self.t1
            # decode rate: tokens produced by decode steps (the first token comes from the prefill logits)
            steps = max(len(res.token_ids) - 1, 0)
            res.decode_tok_s = steps / res.decode_s if res.decode_s > 0 and steps else 0.0
        return events
