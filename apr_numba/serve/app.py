"""The FastAPI application: OpenAI-compatible routes over a :class:`~apr_numba.serve.scheduler.Scheduler`.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/embeddings`` (encoder models),
``GET /v1/models``, ``GET /health``. Streaming responses are server-sent events, one ``data: {json}`` line
per chunk and a final ``data: [DONE]`` (OpenAI's wire format). Errors are OpenAI's error object
``{"error": {"message", "type", "param", "code"}}``: 400 for a malformed body, bad parameters or a prompt
longer than a slot's context, 401 for a missing or wrong API key (``Authorization: Bearer KEY``), 404 for
an unknown model, 503 when the wait queue is full.

Each request becomes a :class:`~apr_numba.serve.scheduler.Job`; the engine thread hands its events over to
the event loop (``loop.call_soon_threadsafe``) into an ``asyncio.Queue``. A streaming client that
disconnects cancels its job (Starlette cancels the response's generator); a non-streaming one is checked
for a disconnect every second while it waits.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from apr_numba.errors import AprError
from apr_numba.generation.completions import (
    chat_chunk,
    chat_logprobs,
    completion_chunk,
    completion_logprobs,
    finish_reason,
    max_tokens_for,
    new_id,
    usage,
)
from apr_numba.generation.decoding import TokenEvent
from apr_numba.generation.generate import GenerationResult, check_max_tokens, prompt_ids
from apr_numba.generation.sampling import SamplingParams, StopChecker
from apr_numba.serve.scheduler import Job, QueueFull, Scheduler
from apr_numba.serve.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

__all__ = ["create_app", "APIError"]


class APIError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request body", None
    e = errs[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return f"malformed JSON body: {e.get('msg')}", None
    where = ".".join(loc)
    return (f"{where}: {e.get('msg')}" if where else str(e.get("msg"))), (loc[0] if loc else None)


def create_app(model, model_id: str, scheduler: Scheduler | None = None, api_key: str | None = None,
               aliases: tuple[str, ...] = ()) -> FastAPI:
    """The ASGI app serving ``model`` under the id ``model_id`` (also accepted: ``aliases``).

    ``model`` is a decoder :class:`~apr_numba.model.Model` (then ``scheduler`` runs it; chat, completions)
    or an :class:`~apr_numba.encoder.EncoderModel` (embeddings only). The scheduler's engine thread starts
    with the app and stops (cancelling what runs) when it shuts down.
    """
    is_encoder = scheduler is None
    names = {model_id, *aliases}
    created = int(time.time())
    embed_lock = asyncio.Lock()

    @asynccontextmanager
    async def lifespan(app):
        if scheduler is not None:
            scheduler.start()
        yield
        if scheduler is not None:
            await run_in_threadpool(scheduler.stop)

    app = FastAPI(title="apr-numba", lifespan=lifespan)
    app.state.scheduler = scheduler

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request, exc: RequestValidationError):
        msg, param = _validation_message(exc)
        return APIError(400, msg, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return APIError(exc.status_code, str(exc.detail), code=code).response()

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return APIError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                "authentication_error", "invalid_api_key").response()
        return await call_next(request)

    def check_model(name: str) -> None:
        if name not in names:
            raise APIError(404, f"model {name!r} is not served here (serving {model_id!r})",
                           "invalid_request_error", "model_not_found", "model")

    @app.get("/health")
    async def health():
        if scheduler is None:
            return {"status": "ok", "model": model_id}
        return {"status": "ok", "model": model_id, "slots": len(scheduler.slots), "active": scheduler.n_active,
                "waiting": len(scheduler.waiting), "completed": scheduler.n_completed,
                "cancelled": scheduler.n_cancelled, "prefilled_tokens": scheduler.n_prefilled,
                "reused_tokens": scheduler.n_reused}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "apr-numba"}]}

    def make_job(loop: asyncio.AbstractEventLoop, ids: list[int], req, logprobs: int | None):
        if is_encoder:
            raise APIError(400, f"{model_id} is an embedding model: use /v1/embeddings", code="model_not_supported")
        if len(ids) >= scheduler.n_ctx:
            raise APIError(400, f"prompt of {len(ids)} tokens does not fit the context of {scheduler.n_ctx} "
                                f"positions", code="context_length_exceeded", param="messages")
        params = SamplingParams(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                                repeat_penalty=req.repeat_penalty, seed=req.seed, min_p=req.min_p)
        n = max_tokens_for(model, len(ids), req.limit, scheduler.n_ctx)
        try:
            params.validate()
            check_max_tokens(n)
            if req.stop:
                StopChecker(req.stop)
        except AprError as exc:
            raise APIError(400, str(exc)) from exc
        queue: asyncio.Queue = asyncio.Queue()
        job = Job(ids, params, n, lambda item: loop.call_soon_threadsafe(queue.put_nowait, item), req.stop or (),
                  logprobs, GenerationResult())
        try:
            scheduler.submit(job)
        except QueueFull as exc:
            raise APIError(503, f"server busy: {exc}", "server_error", "queue_full") from exc
        except RuntimeError as exc:
            raise APIError(503, str(exc), "server_error", "shutting_down") from exc
        return job, queue

    async def events(job: Job, queue: asyncio.Queue):
        """The job's TokenEvents; returns when its GenerationResult arrives (raises on an engine error)."""
        while True:
            item = await queue.get()
            if isinstance(item, GenerationResult):
                return
            if isinstance(item, Exception):
                raise item
            yield item

    async def collect(job: Job, queue: asyncio.Queue, request: Request) -> list[TokenEvent]:
        out: list[TokenEvent] = []
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), 1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    raise APIError(499, "client disconnected") from None
                continue
            if isinstance(item, GenerationResult):
                return out
            if isinstance(item, AprError):
                raise APIError(400, str(item))
            if isinstance(item, Exception):
                raise APIError(500, f"engine error: {item}", "server_error")
            out.append(item)

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def stream(gen_chunks, job: Job) -> StreamingResponse:
        async def body():
            try:
                async for chunk in gen_chunks:
                    yield sse(chunk)
                yield "data: [DONE]\n\n"
            except Exception as exc:  # an engine error mid-stream: tell the client, then end the stream
                yield sse({"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}})
            finally:
                job.cancel()  # a no-op when finished; on a disconnect the engine drops the sequence

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def tokenize(fn, *args) -> list[int]:
        try:
            return fn(*args)
        except AprError as exc:
            raise APIError(400, str(exc)) from exc

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        if is_encoder:
            raise APIError(400, f"{model_id} is an embedding model: use /v1/embeddings", code="model_not_supported")
        ids = tokenize(prompt_ids, model, [m.as_dict() for m in req.messages])
        lp = (req.top_logprobs or 0) if req.logprobs else None
        job, queue = make_job(asyncio.get_running_loop(), ids, req, lp)
        cid, t = new_id("chatcmpl"), int(time.time())
        if req.stream:
            async def chunks():
                yield chat_chunk(cid, t, model_id, {"role": "assistant", "content": ""})
                async for ev in events(job, queue):
                    if ev.text or (lp is not None and ev.token_id >= 0):
                        yield chat_chunk(cid, t, model_id, {"content": ev.text}, None,
                                         chat_logprobs(model, [ev]) if lp is not None else None)
                yield chat_chunk(cid, t, model_id, {}, finish_reason(job.result.stop_reason))
                if req.include_usage:
                    yield {"id": cid, "object": "chat.completion.chunk", "created": t, "model": model_id,
                           "choices": [], "usage": usage(job.result)}
            return stream(chunks(), job)
        evs = await collect(job, queue, request)
        res = job.result
        choice = {"index": 0, "message": {"role": "assistant", "content": res.text},
                  "logprobs": chat_logprobs(model, evs) if lp is not None else None,
                  "finish_reason": finish_reason(res.stop_reason)}
        return {"id": cid, "object": "chat.completion", "created": t, "model": model_id, "choices": [choice],
                "usage": usage(res)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        if is_encoder:
            raise APIError(400, f"{model_id} is an embedding model: use /v1/embeddings", code="model_not_supported")
        ids = tokenize(prompt_ids, model, req.prompt)
        lp = req.logprobs
        job, queue = make_job(asyncio.get_running_loop(), ids, req, lp)
        cid, t = new_id("cmpl"), int(time.time())
        if req.stream:
            async def chunks():
                pos = 0
                async for ev in events(job, queue):
                    if ev.text:
                        yield completion_chunk(cid, t, model_id, ev.text, None,
                                               completion_logprobs(model, [ev], pos) if lp is not None else None)
                        pos += len(ev.text)
                yield completion_chunk(cid, t, model_id, "", finish_reason(job.result.stop_reason))
                if req.include_usage:
                    yield {"id": cid, "object": "text_completion", "created": t, "model": model_id, "choices": [],
                           "usage": usage(job.result)}
            return stream(chunks(), job)
        evs = await collect(job, queue, request)
        res = job.result
        out = completion_chunk(cid, t, model_id, res.text, finish_reason(res.stop_reason),
                               completion_logprobs(model, evs) if lp is not None else None)
        out["usage"] = usage(res)
        return out

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest):
        check_model(req.model)
        if not is_encoder:
            raise APIError(400, f"{model_id} is not an embedding model (serve an encoder such as minilm-l6)",
                           code="model_not_supported")
        from apr_numba.encoder.embedding import embed_ids
        from apr_numba.encoder.texts import check_texts

        texts = req.input
        try:
            texts = check_texts(texts)
            ids = model.tokenize(texts, truncate=False)
        except AprError as exc:
            raise APIError(400, str(exc), param="input") from exc
        async with embed_lock:
            vecs = await run_in_threadpool(embed_ids, model, ids)
        data = []
        for i, v in enumerate(vecs):
            emb = (base64.b64encode(np.ascontiguousarray(v, np.float32).tobytes()).decode()
                   if req.encoding_format == "base64" else v.tolist())
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n = sum(len(x) for x in ids)
        return {"object": "list", "data": data, "model": model_id, "usage": {"prompt_tokens": n, "total_tokens": n}}

    return app
