"""Text generation: prefill the prompt in one batched pass, then decode token by token (gpt-fast's
``prefill`` / ``decode_one_token`` / ``decode_n_tokens``).

The engine knows nothing of any UI: :func:`generate_events` yields a :class:`TokenEvent` per token and
the callers (``generate``, the CLI, the dashboard) decide what to show.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from apr_numba import runtime as _config
from apr_numba.errors import ArgumentError
from apr_numba.generation.sampling import Sampler, SamplingParams, StopChecker
from apr_numba.model.decoder import Model, load


@dataclass
class TokenEvent:
    """One generated token: id, the text it completes (may be "" mid UTF-8 sequence), its index,
    and the wall time since generation started (seconds)."""

    token_id: int
    text: str
    index: int
    elapsed_s: float


@dataclass
class GenerationResult:
    """What a finished generation produced and how fast.

    ``stop_reason``: "eos" (end-of-generation token), "stop" (a stop string), "length" (max_tokens),
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
    threads: int = 0
    threading_layer: str = ""
    backend: str = "cpu"

    def to_dict(self) -> dict:
        return asdict(self)


def prompt_ids(model: Model, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
    """Token ids of the prompt; with ``chat`` the model's chat template is applied first.

    An empty prompt starts from the BOS token when the model has one.

    Raises:
        ArgumentError: chat requested but the model has no template; empty prompt and no BOS token.
    """
    if not isinstance(prompt, str):
        raise ArgumentError(f"prompt must be a string, got {type(prompt).__name__}")
    text = prompt
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        text = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = model.encode(text)
    if not ids:
        bos = model.tokenizer.bos_id
        if bos is None:
            raise ArgumentError("empty prompt and the model has no BOS token to start from")
        ids = [bos]
    return ids


def _stop_list(stop) -> list[str]:
    """``stop`` as a list of stop strings: a single ``str`` is one stop string, not its characters."""
    return [stop] if isinstance(stop, str) else list(stop or ())


_LAST: dict = {}


def _model(model) -> Model:
    """A Model for ``model``: returned as is, or loaded by name/path and kept for the next call with the same
    spec (scripts calling ``generate("smollm2-135m", ...)`` in a loop load it once)."""
    if isinstance(model, Model):
        return model
    key = str(model)
    if key not in _LAST:
        _LAST.clear()
        _LAST[key] = load(model)
    return _LAST[key]


def check_max_tokens(max_tokens) -> None:
    """Raise ArgumentError unless max_tokens is an integer >= 0."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 0:
        raise ArgumentError(f"max_tokens must be an integer >= 0, got {max_tokens!r}")


def generate_events(model: Model, ids: Sequence[int], params: SamplingParams, max_tokens: int,
                    stop: Sequence[str] = (), result: GenerationResult | None = None,
                    cancelled=lambda: False) -> Iterator[TokenEvent]:
    """Prefill ``ids`` and yield one :class:`TokenEvent` per generated token.

    Stops at an end-of-generation token (not yielded), a stop string (text up to it is yielded),
    ``max_tokens``, a full context, or when ``cancelled()`` returns True. Fills ``result`` (timings,
    ids, text, stop_reason) as it goes.

    Raises:
        ArgumentError: max_tokens < 0, bad sampling parameters, prompt longer than the context.
    """
    check_max_tokens(max_tokens)
    params.validate()
    res = result if result is not None else GenerationResult()
    res.prompt_token_ids = [int(i) for i in ids]
    res.threads, res.backend = model.threads, model.backend
    if len(ids) >= model.n_ctx:
        raise ArgumentError(f"prompt of {len(ids)} tokens does not fit the context of {model.n_ctx} "
                            f"positions (at least one more is needed to generate)")
    if max_tokens == 0:
        res.stop_reason = "length"
        return
    sampler = Sampler(params)
    stops = _stop_list(stop)
    stopper = StopChecker(stops) if stops else None
    dec = model.tokenizer.stream_decoder()
    eos = model.tokenizer.eos_ids
    history = list(res.prompt_token_ids)
    texts: list[str] = []

    t0 = time.perf_counter()
    model.reset()
    logits = model.eval(ids, n_logits=1)[-1]
    t1 = time.perf_counter()
    res.prefill_s = t1 - t0
    res.prefill_tok_s = len(ids) / res.prefill_s if res.prefill_s > 0 else 0.0
    res.threading_layer = _config.threading_layer()
    n = 0
    res.stop_reason = "length"
    while True:
        tok = sampler.sample(logits, history)
        if n == 0:
            res.time_to_first_token_s = time.perf_counter() - t0
        if tok in eos:
            res.stop_reason = "eos"
            break
        n += 1
        history.append(tok)
        res.token_ids.append(tok)
        piece = dec.push(tok)
        hit = False
        if stopper is not None:
            piece, hit = stopper.feed(piece)
        texts.append(piece)
        res.text = "".join(texts)
        yield TokenEvent(tok, piece, n - 1, time.perf_counter() - t0)
        if hit:
            res.stop_reason = "stop"
            break
        if n >= max_tokens:
            break
        if cancelled():
            res.stop_reason = "cancelled"
            break
        if model.n_past >= model.n_ctx:
            res.stop_reason = "context"
            break
        logits = model.eval([tok], n_logits=1)[-1]
    tail = dec.flush()
    if stopper is not None and res.stop_reason != "stop":
        tail, _ = stopper.feed(tail)
        tail += stopper.flush()
    if tail:
        texts.append(tail)
        res.text = "".join(texts)
        yield TokenEvent(-1, tail, n, time.perf_counter() - t0)
    res.decode_s = time.perf_counter() - t1
    # decode rate: tokens produced by decode steps (the first token comes from the prefill logits)
    steps = max(len(res.token_ids) - 1, 0)
    res.decode_tok_s = steps / res.decode_s if res.decode_s > 0 and steps else 0.0


def run(model, prompt: str, max_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
        top_p: float = 1.0, repeat_penalty: float = 1.0, seed: int | None = None, chat: bool = False,
        stop: Sequence[str] = (), on_token=None) -> GenerationResult:
    """Generate to completion and return a :class:`GenerationResult` (text, ids, timings).

    ``on_token(event)`` is called for every :class:`TokenEvent`. Same arguments and errors as
    :func:`generate`.
    """
    m = _model(model)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                            repeat_penalty=repeat_penalty, seed=seed)
    res = GenerationResult()
    for ev in generate_events(m, prompt_ids(m, prompt, chat), params, max_tokens, stop, res):
        if on_token is not None:
            on_token(ev)
    return res


def generate(model, prompt: str, max_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, repeat_penalty: float = 1.0, seed: int | None = None, chat: bool = False,
             stream: bool = False, stop: Sequence[str] = ()):
    """Generate a continuation of ``prompt``.

    Args:
        model: a :class:`Model`, a registry name (e.g. "smollm2-135m") or a .gguf/.apr path.
        prompt: the text to continue; with ``chat=True`` it is the user message and the model's chat
            template is applied.
        max_tokens: most tokens to generate (>= 0).
        temperature: 0 = greedy; top_k (0 = off), top_p (1 = off), repeat_penalty (1 = off): HF semantics.
        seed: sampling seed; the same seed gives the same text.
        stream: return an iterator of text pieces instead of the whole text.
        stop: stop strings (not included in the output).

    Returns:
        the generated text (str), or an iterator of str pieces when ``stream=True``.

    Raises:
        ArgumentError: bad arguments (max_tokens < 0, top_p out of (0, 1], prompt longer than the context...).
        ModelFormatError / PullError: the model could not be loaded.
    """
    m = _model(model)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                            repeat_penalty=repeat_penalty, seed=seed)
    params.validate()
    check_max_tokens(max_tokens)
    ids = prompt_ids(m, prompt, chat)
    if len(ids) >= m.n_ctx:
        raise ArgumentError(f"prompt of {len(ids)} tokens does not fit the context of {m.n_ctx} positions")
    stop = _stop_list(stop)
    if stop:
        StopChecker(stop)  # raises ArgumentError now (not at the first next() of a stream) on a bad stop string
    events = generate_events(m, ids, params, max_tokens, stop)
    if stream:
        return (ev.text for ev in events if ev.text)
    return "".join(ev.text for ev in events)
