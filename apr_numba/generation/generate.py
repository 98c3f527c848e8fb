"""Text generation: prefill the prompt in one batched pass, then decode token by token (gpt-fast's
``prefill`` / ``decode_one_token`` / ``decode_n_tokens``).

The engine knows nothing of any UI: :func:`generate_events` yields a :class:`TokenEvent` per token and
the callers (``generate``, the CLI, the dashboard) decide what to show.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Literal, overload

from apr_numba.errors import ArgumentError
from apr_numba.generation.decoding import GenerationResult, SequenceDecoder, TokenEvent, check_max_tokens
from apr_numba.generation.sampling import SamplingParams, StopChecker
from apr_numba.model.decoder import Model, load
from apr_numba.model.tokenizer import check_text

__all__ = ["GenerationResult", "TokenEvent", "generate", "generate_events", "prompt_ids", "run", "Prompt"]

#: a prompt: text, or an OpenAI-style message list ``[{"role": "user", "content": "..."}, ...]``
Prompt = str | Sequence[Mapping[str, str]]


def render_messages(model: Model, messages, system: str | None = None) -> str:
    """The chat-template text of an OpenAI-style message list, ending with the assistant's generation prompt.

    ``system`` is prepended as a system message unless the list already starts with one.

    Raises:
        ArgumentError: not a list of {"role": str, "content": str} dicts, or the model has no chat template.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ArgumentError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    msgs = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ArgumentError(f"messages[{i}] must be a dict with str 'role' and 'content', got {m!r}")
        msgs.append({"role": m["role"], "content": m["content"]})
    if system is not None and not (msgs and msgs[0]["role"] == "system"):
        msgs.insert(0, {"role": "system", "content": system})
    return model.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)


def prompt_ids(model: Model, prompt: Prompt, chat: bool = False, system: str | None = None) -> list[int]:
    """Token ids of the prompt.

    ``prompt`` is text, or a message list (always rendered through the chat template); with ``chat`` a text
    prompt is the user message of a one-turn chat (``system`` its system message). An empty prompt starts
    from the BOS token when the model has one.

    Raises:
        ArgumentError: not text or a message list; chat requested but the model has no template; empty
            prompt and no BOS token.
    """
    if not isinstance(prompt, str):
        if isinstance(prompt, Sequence) and not isinstance(prompt, bytes):
            return prompt_ids(model, render_messages(model, prompt, system))
        raise ArgumentError(f"prompt must be a string or a list of messages, got {type(prompt).__name__}")
    check_text(prompt, "prompt")  # a lone surrogate (non-UTF-8 bytes on the command line) cannot be tokenized
    text = prompt
    if chat or system is not None:
        text = render_messages(model, [{"role": "user", "content": prompt}], system)
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


def generate_events(model: Model, ids: Sequence[int], params: SamplingParams, max_tokens: int,
                    stop: Sequence[str] = (), result: GenerationResult | None = None,
                    cancelled=lambda: False, reuse: bool = False, logprobs: int | None = None,
                    state=None) -> Iterator[TokenEvent]:
    """Prefill ``ids`` and yield one :class:`TokenEvent` per generated token (a :class:`SequenceDecoder`).

    Stops at an end-of-generation token (not yielded), a stop string (text up to it is yielded),
    ``max_tokens``, a full context, or when ``cancelled()`` returns True. Fills ``result`` (timings,
    ids, text, stop_reason) as it goes. ``reuse``: keep the cached prefix the prompt shares with the
    state's tokens (else prefill from position 0). ``logprobs``: None = off, else how many top
    alternatives each event carries. ``state``: the KV state (default: the model's own).

    Raises:
        ArgumentError: max_tokens < 0, bad sampling parameters, prompt longer than the context.
    """
    res = result if result is not None else GenerationResult()
    seq = SequenceDecoder(model, ids, params, max_tokens, stop, state=state, result=res, logprobs=logprobs,
                          reuse=reuse)
    seq.start()
    st = seq.state
    while not seq.done:
        events = seq.sample()
        for ev in events:
            if logprobs is not None and ev.token_id >= 0:
                res.logprobs.append({"token_id": ev.token_id, "logprob": ev.logprob, "top_logprobs": ev.top_logprobs})
            yield ev
        if seq.done:
            break
        if cancelled():
            yield from seq.cancel()
            break
        seq.feed(model.eval([seq.next_token], n_logits=1, state=st)[-1])


def _params(temperature, top_k, top_p, min_p, repeat_penalty, seed) -> SamplingParams:
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repeat_penalty=repeat_penalty,
                            seed=seed, min_p=min_p)
    params.validate()
    return params


def run(model, prompt: Prompt, max_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
        top_p: float = 1.0, repeat_penalty: float = 1.0, seed: int | None = None, chat: bool = False,
        stop: Sequence[str] = (), on_token=None, *, system: str | None = None, min_p: float = 0.0,
        logprobs: bool = False, top_logprobs: int = 0, reuse_cache: bool = True) -> GenerationResult:
    """Generate to completion and return a :class:`GenerationResult` (text, ids, timings, logprobs).

    ``on_token(event)`` is called for every :class:`TokenEvent`. ``logprobs``: fill ``result.logprobs``
    (with ``top_logprobs`` alternatives per token). Other arguments and errors as :func:`generate`.
    """
    m = _model(model)
    params = _params(temperature, top_k, top_p, min_p, repeat_penalty, seed)
    res = GenerationResult()
    lp = int(top_logprobs) if logprobs else None
    for ev in generate_events(m, prompt_ids(m, prompt, chat, system), params, max_tokens, stop, res,
                              reuse=reuse_cache, logprobs=lp):
        if on_token is not None:
            on_token(ev)
    return res


@overload
def generate(model, prompt: Prompt, max_tokens: int = ..., temperature: float = ..., top_k: int = ...,
             top_p: float = ..., repeat_penalty: float = ..., seed: int | None = ..., chat: bool = ...,
             stream: Literal[False] = ..., stop: Sequence[str] = ..., *, system: str | None = ...,
             min_p: float = ..., reuse_cache: bool = ...) -> str: ...


@overload
def generate(model, prompt: Prompt, max_tokens: int = ..., temperature: float = ..., top_k: int = ...,
             top_p: float = ..., repeat_penalty: float = ..., seed: int | None = ..., chat: bool = ...,
             *, stream: Literal[True], stop: Sequence[str] = ..., system: str | None = ...,
             min_p: float = ..., reuse_cache: bool = ...) -> Iterator[str]: ...


def generate(model, prompt: Prompt, max_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, repeat_penalty: float = 1.0, seed: int | None = None, chat: bool = False,
             stream: bool = False, stop: Sequence[str] = (), *, system: str | None = None, min_p: float = 0.0,
             reuse_cache: bool = True) -> str | Iterator[str]:
    """Generate a continuation of ``prompt``.

    Args:
        model: a :class:`Model`, a registry name (e.g. "smollm2-135m") or a .gguf/.apr path.
        prompt: the text to continue, or an OpenAI-style message list ``[{"role": "user", "content": ...}]``
            rendered through the model's chat template; with ``chat=True`` a text prompt is the user message.
        system: a system message (prepended to the messages; a text prompt then counts as a chat).
        max_tokens: most tokens to generate (>= 0).
        temperature: 0 = greedy; top_k (0 = off), top_p (1 = off), repeat_penalty (1 = off): HF semantics;
            min_p (0 = off): llama.cpp's min-p, keep tokens with p >= min_p * p_max.
        seed: sampling seed; the same seed gives the same text.
        stream: return an iterator of text pieces instead of the whole text.
        stop: stop strings (not included in the output).
        reuse_cache: keep the KV of the longest prefix the prompt shares with what the model's cache holds
            (the previous prompt and its generated tokens) and prefill only the rest (llama.cpp's prompt
            cache); False prefills everything.

    Returns:
        the generated text (str), or an iterator of str pieces when ``stream=True``.

    Raises:
        ArgumentError: bad arguments (max_tokens < 0, top_p out of (0, 1], prompt longer than the context...).
        ModelFormatError / PullError: the model could not be loaded.
    """
    m = _model(model)
    params = _params(temperature, top_k, top_p, min_p, repeat_penalty, seed)
    check_max_tokens(max_tokens)
    ids = prompt_ids(m, prompt, chat, system)
    if len(ids) >= m.n_ctx:
        raise ArgumentError(f"prompt of {len(ids)} tokens does not fit the context of {m.n_ctx} positions")
    stop = _stop_list(stop)
    if stop:
        StopChecker(stop)  # raises ArgumentError now (not at the first next() of a stream) on a bad stop string
    events = generate_events(m, ids, params, max_tokens, stop, reuse=reuse_cache)
    if stream:
        return (ev.text for ev in events if ev.text)
    return "".join(ev.text for ev in events)
