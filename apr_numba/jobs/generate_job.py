"""Batch generation: ``apr_numba.generate_batch(model, rows_or_input, output, backend="local"|"ray")`` and
``apr-numba batch MODEL --input FILE --output FILE``.

A row is ``{"prompt": str}`` (plain text continued as is, or wrapped in the chat template with ``chat=True``)
or ``{"messages": [{"role": ..., "content": ...}, ...]}`` (always through the model's chat template, with the
generation prompt added), plus optional ``id`` and sampling fields ``max_tokens``, ``temperature``, ``top_p``,
``top_k``, ``repeat_penalty``, ``seed``, ``stop`` (a string or a list); missing fields take the job's defaults.
Plain-text input is one prompt per line. Each row runs :func:`apr_numba.generation.generate.generate_events` on a
fresh KV cache, so a row's output does not depend on the other rows, the shard, the backend or the worker.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

from apr_numba.errors import ArgumentError
from apr_numba.jobs import shards as jio
from apr_numba.jobs.runner import check_backend, run_job
from apr_numba.jobs.shards import JSONL, PARQUET, ROW, SHARD, PartStore, read_shard, require_pyarrow, where

PARAMS = {"max_tokens": int, "temperature": float, "top_p": float, "top_k": int, "repeat_penalty": float,
          "seed": int}
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "cancelled": "cancelled"}


def _check_row(path, r: dict) -> dict:
    """The generation request of record ``r`` (prompt or messages, id, sampling fields), validated."""
    req = {"id": r.get("id", r[ROW])}
    prompt, messages = r.get("prompt"), r.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ArgumentError(f"{where(path, r)}: 'messages' must be a non-empty list of "
                                f"{{'role': str, 'content': str}} objects")
        req["messages"] = [{"role": m["role"], "content": m["content"]} for m in messages]
    elif isinstance(prompt, str):
        req["prompt"] = prompt
    else:
        raise ArgumentError(f"{where(path, r)}: no 'prompt' (a string) or 'messages' (a chat list)")
    for k, typ in PARAMS.items():
        v = r.get(k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (typ is int and v != int(v)):
            raise ArgumentError(f"{where(path, r)}: {k!r} must be {'an integer' if typ is int else 'a number'}, "
                                f"got {v!r}")
        req[k] = typ(v)
    stop = r.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ArgumentError(f"{where(path, r)}: 'stop' must be a string or a list of strings")
        req["stop"] = stops
    return req


def prompt_reader(path: str, shard):
    """Shard table for the generation workers: ``_shard``, ``_row`` int64 and ``request`` (the validated
    row as a JSON string: its fields vary from row to row).

    Raises:
        ArgumentError: a record without prompt/messages or with a badly typed field (file and line named).
    """
    pa = require_pyarrow()
    rows = read_shard(path, shard, line_key="prompt")
    reqs = [json.dumps(_check_row(path, r), ensure_ascii=False) for r in rows]
    try:
        ids = pa.array([json.loads(q)["id"] for q in reqs])
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ArgumentError(f"{path}: ids of mixed types in records {shard.start}-{shard.stop - 1} ({exc})") from exc
    n = len(rows)
    return pa.table({SHARD: pa.array([shard.index] * n, pa.int64()), ROW: pa.array([r[ROW] for r in rows], pa.int64()),
                     "id": ids, "request": pa.array(reqs, pa.string())})


class Generator:
    """Worker of the batch generation job (the Ray Data actor class; also run in-process locally).

    Loads the decoder once (CPU backend); ``__call__(table)`` maps a shard table (:func:`prompt_reader`) to
    ``_shard``, ``id``, ``text`` string, ``prompt_tokens`` / ``completion_tokens`` int64, ``finish_reason``
    ("stop": end of generation or a stop string, "length": max_tokens or a full context) and ``token_ids``
    list<int64>.
    """

    def __init__(self, model, defaults: dict, chat: bool = False, n_ctx: int | None = None,
                 threads: int | None = None):
        from apr_numba.jobs.embed_job import limit_threads
        from apr_numba.model.decoder import load

        n = limit_threads(threads)
        self.model = load(model, backend="cpu", threads=n, n_ctx=n_ctx)
        self.defaults, self.chat = dict(defaults), bool(chat)

    def _ids(self, req: dict) -> list[int]:
        from apr_numba.generation.generate import prompt_ids

        if "messages" in req:
            tok = self.model.tokenizer
            text = tok.apply_chat_template(req["messages"], add_generation_prompt=True)
            return self.model.encode(text) or ([tok.bos_id] if tok.bos_id is not None else [])
        return prompt_ids(self.model, req["prompt"], self.chat)

    def __call__(self, table):
        from apr_numba.jobs.embed_job import single_threaded_blas

        with single_threaded_blas():
            return self._run(table)

    def _run(self, table):
        from apr_numba.generation.generate import GenerationResult, generate_events
        from apr_numba.generation.sampling import SamplingParams

        pa = require_pyarrow()
        out = {k: [] for k in ("text", "prompt_tokens", "completion_tokens", "finish_reason", "token_ids")}
        for q in table.column("request").to_pylist():
            req = dict(self.defaults, **json.loads(q))
            params = SamplingParams(req["temperature"], req["top_k"], req["top_p"], req["repeat_penalty"],
                                    seed=req.get("seed"))
            res = GenerationResult()
            for _ in generate_events(self.model, self._ids(req), params, req["max_tokens"], req.get("stop") or (),
                                     res):
                pass
            out["text"].append(res.text)
            out["prompt_tokens"].append(len(res.prompt_token_ids))
            out["completion_tokens"].append(len(res.token_ids))
            out["finish_reason"].append(FINISH.get(res.stop_reason, res.stop_reason))
            out["token_ids"].append(res.token_ids)
        return pa.table({SHARD: table.column(SHARD), "id": table.column("id"),
                         "text": pa.array(out["text"], pa.string()),
                         "prompt_tokens": pa.array(out["prompt_tokens"], pa.int64()),
                         "completion_tokens": pa.array(out["completion_tokens"], pa.int64()),
                         "finish_reason": pa.array(out["finish_reason"], pa.string()),
                         "token_ids": pa.array(out["token_ids"], pa.list_(pa.int64()))})


def _output_kind(output) -> str:
    suffix = Path(output).suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return JSONL
    if suffix in (".parquet", ".pq"):
        return PARQUET
    raise ArgumentError(f"{output}: batch results are written as .jsonl or .parquet, not {suffix or 'no suffix'}")


def generate_batch(model, rows_or_input, output=None, *, backend: str = "local", max_tokens: int = 128,
                   temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, repeat_penalty: float = 1.0,
                   seed: int | None = None, stop=(), chat: bool = False, n_ctx: int | None = None,
                   shard_size: int = 16, workers: int = 2, threads: int | None = None,
                   ray_address: str | None = None, overwrite: bool = False, progress: bool | None = None):
    """Generate a completion for every row (see the module docstring for the row fields).

    Args:
        model: decoder registry name (``"smollm2-135m"``) or ``.gguf`` / ``.apr`` path (runs on the CPU).
        rows_or_input: a ``.jsonl`` / ``.parquet`` / text file, or a list of rows (dicts, or str prompts).
        output: ``.jsonl`` or ``.parquet`` with one row per input row, in input order: ``id``, ``text``,
            ``prompt_tokens``, ``completion_tokens``, ``finish_reason``, ``token_ids``. Required for a file
            input; optional for a list (then the rows are only returned).
        backend: ``"local"`` or ``"ray"`` (``workers`` actors of ``threads`` threads each, on the cluster at
            ``ray_address``, the one already joined, or a new local one).
        max_tokens, temperature, top_p, top_k, repeat_penalty, seed, stop: defaults for rows that do not set
            them (HF semantics, as :func:`apr_numba.generate`; temperature 0 = greedy).
        chat: wrap plain ``prompt`` rows in the chat template (``messages`` rows always are).
        n_ctx: KV cache positions per worker (default: the model's, at most 4096).
        shard_size: rows per part file (the unit of resumption and of Ray work).

    Returns:
        list of result dicts (list input) or the job statistics dict (file input: ``rows``, ``computed_rows``,
        ``skipped_rows``, ``seconds``, ``rows_per_s``, ``backend``, ``output``).

    Raises:
        ArgumentError: bad arguments, a bad row (file and line named), bad output suffix, existing output without
            ``overwrite``, Ray not installed; ModelFormatError / PullError: the model could not be loaded.
    """
    from apr_numba.generation.generate import check_max_tokens
    from apr_numba.generation.sampling import SamplingParams

    check_max_tokens(max_tokens)
    SamplingParams(temperature, top_k, top_p, repeat_penalty, seed=seed).validate()
    check_backend(backend, workers, threads)
    require_pyarrow()
    if isinstance(rows_or_input, (str, Path)):
        if output is None:
            raise ArgumentError("generate_batch: output is required when the input is a file")
        return _run_file(model, Path(rows_or_input), Path(output), locals())
    rows = [{"prompt": r} if isinstance(r, str) else r for r in rows_or_input]
    if not all(isinstance(r, dict) for r in rows):
        raise ArgumentError("generate_batch: rows must be dicts (prompt/messages + sampling fields) or str prompts")
    with tempfile.TemporaryDirectory(prefix="apr-batch-") as tmp:
        src = Path(tmp) / "rows.jsonl"
        src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        dst = Path(output) if output is not None else Path(tmp) / "out.parquet"
        _run_file(model, src, dst, dict(locals_of_call(locals()), overwrite=True if output is None else overwrite))
        pq = require_pyarrow().parquet
        if _output_kind(dst) == JSONL:
            return [json.loads(line) for line in dst.read_text(encoding="utf-8").splitlines()]
        return pq.read_table(dst).to_pylist()


def locals_of_call(d: dict) -> dict:
    """The job options among a ``generate_batch`` call's locals."""
    return {k: d[k] for k in ("backend", "max_tokens", "temperature", "top_p", "top_k", "repeat_penalty", "seed",
                              "stop", "chat", "n_ctx", "shard_size", "workers", "threads", "ray_address",
                              "overwrite", "progress") if k in d}


def _run_file(model, src: Path, dst: Path, o: dict) -> dict:
    from apr_numba.jobs.embed_job import _model_spec

    o = locals_of_call(o)
    kind = _output_kind(dst)
    if src.suffix.lower() == ".json":
        raise ArgumentError(f"{src}: use JSON Lines (.jsonl, one object per line), not a .json document")
    spec = _model_spec(model)
    if o["backend"] == "ray" and not isinstance(spec, str):
        raise ArgumentError("backend='ray' needs the model as a name or path (each actor loads its own copy)")
    stop = [o["stop"]] if isinstance(o["stop"], str) else list(o["stop"] or ())
    defaults = {"max_tokens": int(o["max_tokens"]), "temperature": float(o["temperature"]),
                "top_p": float(o["top_p"]), "top_k": int(o["top_k"]), "repeat_penalty": float(o["repeat_penalty"]),
                "seed": o["seed"], "stop": stop}
    shards = jio.plan_shards(src, o["shard_size"])
    config = {"job": "batch", "input": jio.fingerprint(src), "model": str(spec), "defaults": defaults,
              "chat": bool(o["chat"]), "n_ctx": o["n_ctx"], "shard_size": int(o["shard_size"]), "format": kind}
    store = PartStore(dst, config, len(shards), overwrite=o["overwrite"])
    reader = functools.partial(prompt_reader, str(src.resolve()))
    kwargs = {"model": spec, "defaults": defaults, "chat": o["chat"], "n_ctx": o["n_ctx"]}
    stats = run_job(shards, store, reader, Generator, kwargs, backend=o["backend"], ray_address=o["ray_address"],
                    workers=o["workers"], threads=o["threads"], progress=o["progress"], unit="row")
    (jio.merge_jsonl if kind == JSONL else jio.merge_parquet)(store, dst)
    store.remove()
    return dict(stats, output=str(dst))
