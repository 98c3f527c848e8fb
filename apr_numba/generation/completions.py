"""OpenAI / llama-cpp-python response shapes: ``create_chat_completion`` and ``create_completion``.

The dicts follow OpenAI's Chat Completions and (legacy) Completions API objects, as llama-cpp-python's
``Llama.create_chat_completion`` / ``create_completion`` return them: ``id``, ``object``
("chat.completion", "chat.completion.chunk", "text_completion"), ``created`` (Unix seconds), ``model``,
``choices`` (``message`` / ``delta`` / ``text``, ``finish_reason`` "stop" or "length", ``logprobs``) and
``usage`` (prompt / completion / total token counts). The builders here are also what the server sends.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, overload

from apr_numba.errors import ArgumentError
from apr_numba.generation.decoding import TokenEvent
from apr_numba.generation.generate import GenerationResult, _model, _params, generate_events, prompt_ids

__all__ = ["create_chat_completion", "create_completion", "finish_reason", "chat_logprobs", "completion_logprobs",
           "usage", "new_id"]

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "cancelled": "stop"}


def finish_reason(stop_reason: str) -> str:
    """OpenAI's finish_reason of a :attr:`GenerationResult.stop_reason`: "stop" (EOS or a stop string) or
    "length" (max_tokens or the context full)."""
    return FINISH[stop_reason]


def new_id(prefix: str) -> str:
    """A fresh response id such as ``chatcmpl-<hex>``."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(res: GenerationResult) -> dict:
    """``{"prompt_tokens", "completion_tokens", "total_tokens"}`` of a finished generation."""
    p, c = len(res.prompt_token_ids), len(res.token_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _tok(model, token_id: int, logprob: float) -> dict:
    b = model.tokenizer.token_bytes()[token_id]
    return {"token": b.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(b)}


def chat_logprobs(model, events: Iterable[TokenEvent]) -> dict:
    """Chat ``logprobs``: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]}``."""
    content = []
    for ev in events:
        if ev.token_id < 0 or ev.logprob is None:
            continue
        d = _tok(model, ev.token_id, ev.logprob)
        d["top_logprobs"] = [_tok(model, i, lp) for i, lp in ev.top_logprobs]
        content.append(d)
    return {"content": content}


def completion_logprobs(model, events: Iterable[TokenEvent], offset: int = 0) -> dict:
    """Legacy completion ``logprobs``: ``tokens``, ``token_logprobs``, ``top_logprobs`` ({token: logprob})
    and ``text_offset`` (character offsets of each token's text, from ``offset``)."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    pos = offset
    for ev in events:
        if ev.token_id < 0 or ev.logprob is None:
            continue
        out["tokens"].append(_tok(model, ev.token_id, ev.logprob)["token"])
        out["token_logprobs"].append(ev.logprob)
        out["top_logprobs"].append({_tok(model, i, lp)["token"]: lp for i, lp in ev.top_logprobs})
        out["text_offset"].append(pos)
        pos += len(ev.text)
    return out


def max_tokens_for(model, n_prompt: int, max_tokens: int | None, n_ctx: int | None = None) -> int:
    """``max_tokens``, or (None) as many as the context leaves after the prompt (llama-cpp-python's default)."""
    if max_tokens is None:
        return max((n_ctx or model.n_ctx) - n_prompt, 0)
    return max_tokens


def _events(model, ids, max_tokens, temperature, top_p, top_k, min_p, repeat_penalty, seed, stop, logprobs,
            top_logprobs, res):
    params = _params(temperature, top_k, top_p, min_p, repeat_penalty, seed)
    if top_logprobs and not logprobs:
        raise ArgumentError("top_logprobs needs logprobs=True")
    lp = int(top_logprobs or 0) if logprobs else None
    n = max_tokens_for(model, len(ids), max_tokens)
    return generate_events(model, ids, params, n, stop or (), res, reuse=True, logprobs=lp)


@overload
def create_chat_completion(model, messages: Sequence[Mapping[str, str]], *, stream: Literal[False] = ...,
                           **kw: Any) -> dict: ...


@overload
def create_chat_completion(model, messages: Sequence[Mapping[str, str]], *, stream: Literal[True],
                           **kw: Any) -> Iterator[dict]: ...


def create_chat_completion(model, messages: Sequence[Mapping[str, str]], *, max_tokens: int | None = None,
                           temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                           repeat_penalty: float = 1.0, seed: int | None = None, stop: str | Sequence[str] = (),
                           stream: bool = False, logprobs: bool = False, top_logprobs: int = 0,
                           model_name: str | None = None) -> dict | Iterator[dict]:
    """A chat completion of ``messages`` (rendered through the model's chat template), as OpenAI returns it.

    Args:
        model: a :class:`~apr_numba.model.Model`, registry name or path.
        messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
        max_tokens: most tokens to generate (None: until the context is full).
        temperature (0 = greedy), top_p, top_k, min_p, repeat_penalty, seed, stop: as :func:`apr_numba.generate`.
        stream: return an iterator of ``chat.completion.chunk`` dicts (first delta carries the role, the last
            one ``finish_reason``) instead of one ``chat.completion`` dict.
        logprobs, top_logprobs: add ``choices[0].logprobs.content`` (raw-softmax ln p of each token and its
            ``top_logprobs`` alternatives, 0..20).
        model_name: the ``model`` field (default: the model file's name).

    Returns:
        ``{"id", "object": "chat.completion", "created", "model", "choices": [{"index": 0, "message":
        {"role": "assistant", "content"}, "finish_reason", "logprobs"}], "usage"}``, or an iterator of chunks.

    Raises:
        ArgumentError: bad messages or sampling arguments, prompt longer than the context.
    """
    m = _model(model)
    ids = prompt_ids(m, messages)
    name = model_name or m.path.name
    res = GenerationResult()
    events = _events(m, ids, max_tokens, temperature, top_p, top_k, min_p, repeat_penalty, seed, stop, logprobs,
                     top_logprobs, res)
    cid, created = new_id("chatcmpl"), int(time.time())
    if stream:
        return _chat_stream(m, events, res, cid, created, name, logprobs)
    evs = list(events)
    choice = {"index": 0, "message": {"role": "assistant", "content": res.text},
              "logprobs": chat_logprobs(m, evs) if logprobs else None, "finish_reason": finish_reason(res.stop_reason)}
    return {"id": cid, "object": "chat.completion", "created": created, "model": name, "choices": [choice],
            "usage": usage(res)}


def chat_chunk(cid: str, created: int, name: str, delta: dict, finish: str | None = None,
               logprobs: dict | None = None) -> dict:
    """One ``chat.completion.chunk``."""
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}


def _chat_stream(m, events, res, cid, created, name, logprobs) -> Iterator[dict]:
    yield chat_chunk(cid, created, name, {"role": "assistant", "content": ""})
    for ev in events:
        if ev.text or (logprobs and ev.token_id >= 0):
            yield chat_chunk(cid, created, name, {"content": ev.text}, None,
                             chat_logprobs(m, [ev]) if logprobs else None)
    yield chat_chunk(cid, created, name, {}, finish_reason(res.stop_reason))


def completion_chunk(cid: str, created: int, name: str, text: str, finish: str | None = None,
                     logprobs: dict | None = None) -> dict:
    """One ``text_completion`` object (a whole response, or a streamed piece)."""
    return {"id": cid, "object": "text_completion", "created": created, "model": name,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]}


def create_completion(model, prompt: str, *, max_tokens: int | None = 16, temperature: float = 0.0,
                      top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, repeat_penalty: float = 1.0,
                      seed: int | None = None, stop: str | Sequence[str] = (), stream: bool = False,
                      logprobs: int | None = None, model_name: str | None = None) -> dict | Iterator[dict]:
    """A text completion of ``prompt`` (no chat template), as OpenAI's legacy Completions API returns it.

    ``max_tokens`` defaults to 16 as OpenAI's; ``logprobs`` (0..20) adds the legacy logprobs object with that
    many alternatives per token. Other arguments, returns and errors as :func:`create_chat_completion`
    (``object`` is "text_completion", ``choices[0].text`` the text).
    """
    m = _model(model)
    if not isinstance(prompt, str):
        raise ArgumentError(f"prompt must be a string, got {type(prompt).__name__}")
    ids = prompt_ids(m, prompt)
    name = model_name or m.path.name
    res = GenerationResult()
    events = _events(m, ids, max_tokens, temperature, top_p, top_k, min_p, repeat_penalty, seed, stop,
                     logprobs is not None, logprobs, res)
    cid, created = new_id("cmpl"), int(time.time())
    if stream:
        return _completion_stream(m, events, res, cid, created, name, logprobs is not None)
    evs = list(events)
    out = completion_chunk(cid, created, name, res.text, finish_reason(res.stop_reason),
                           completion_logprobs(m, evs) if logprobs is not None else None)
    out["usage"] = usage(res)
    return out


def _completion_stream(m, events, res, cid, created, name, logprobs) -> Iterator[dict]:
    pos = 0
    for ev in events:
        if ev.text:
            yield completion_chunk(cid, created, name, ev.text, None,
                                   completion_logprobs(m, [ev], pos) if logprobs else None)
            pos += len(ev.text)
    yield completion_chunk(cid, created, name, "", finish_reason(res.stop_reason))
