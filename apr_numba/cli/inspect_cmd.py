"""``apr-numba inspect``: architecture, config, tokenizer, tensors and quant mix of a model file.

Reads only the header and tensor table (no weights are packed), so it is fast on any size of model.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict
from typing import Any

from apr_numba.errors import AprError
from apr_numba.model.hparams import ModelConfig


def inspect_model(model) -> dict[str, Any]:
    """A JSON-able description of a model file.

    Keys: path, format, file_bytes, architecture, config (ModelConfig fields), tokenizer (model, pre,
    vocab_size, bos/eos ids, has_chat_template), tensors (name, dtype, shape, bytes, offset),
    quant_mix (dtype -> {count, bytes}), tensor_bytes.

    Raises:
        ArgumentError / ModelFormatError / PullError: as :func:`apr_numba.load`.
    """
    from apr_numba.hub.pull import resolve_model
    from apr_numba.model.decoder import _open_source

    path = resolve_model(model)
    if path.is_dir():
        raise AprError(f"{path}: is a directory, not a .gguf or .apr file")
    src = _open_source(path, refuse=False)  # describe any well-formed file, supported or not
    meta = src.metadata
    emb = src.tensors.get("token_embd.weight")
    n_vocab = emb.shape[0] if emb is not None else None
    try:
        cfg: dict[str, Any] | None = asdict(ModelConfig.from_metadata(meta, str(path), n_vocab=n_vocab))
    except AprError as exc:
        cfg = {"error": str(exc)}
    tensors = [{"name": t.name, "dtype": t.type_name, "shape": list(t.shape), "bytes": t.nbytes,
                "offset": t.offset} for t in src.tensors.values()]
    mix: dict[str, dict[str, int]] = defaultdict(lambda: {"count": 0, "bytes": 0})
    for t in tensors:
        mix[t["dtype"]]["count"] += 1
        mix[t["dtype"]]["bytes"] += t["bytes"]
    toks = meta.get("tokenizer.ggml.tokens")
    tok = {
        "model": meta.get("tokenizer.ggml.model"),
        "pre": meta.get("tokenizer.ggml.pre"),
        "vocab_size": len(toks) if isinstance(toks, list) else n_vocab,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "has_chat_template": bool(meta.get("tokenizer.chat_template")),
    }
    info = {
        "path": str(path), "format": type(src).__name__.replace("File", "").upper(),
        "file_bytes": path.stat().st_size, "architecture": meta.get("general.architecture"),
        "name": meta.get("general.name"), "config": cfg, "tokenizer": tok,
        "quant_mix": dict(mix), "tensor_bytes": sum(t["bytes"] for t in tensors), "tensors": tensors,
    }
    if hasattr(src, "describe"):  # .apr: header, flags, both CRC32s, metadata, the index as stored
        info["apr"] = src.describe()
        info["tensors"] = info["apr"]["tensors"]
    return info


def render_inspect(info: dict[str, Any]) -> None:
    """Print :func:`inspect_model`'s result as rich tables."""
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(f"[bold]{info['path']}[/] ({info['format']}, {info['file_bytes']:,} bytes)")
    con.print(f"architecture: {info['architecture']}   name: {info['name']}")
    cfg = Table(title="config", show_header=False)
    for k, v in (info["config"] or {}).items():
        cfg.add_row(k, str(v))
    con.print(cfg)
    con.print("tokenizer: " + ", ".join(f"{k}={v}" for k, v in info["tokenizer"].items()))
    mix = Table(title="quant mix")
    for col in ("dtype", "tensors", "bytes"):
        mix.add_column(col, justify="right")
    for k, v in sorted(info["quant_mix"].items(), key=lambda kv: -kv[1]["bytes"]):
        mix.add_row(k, str(v["count"]), f"{v['bytes']:,}")
    mix.add_row("total", str(len(info["tensors"])), f"{info['tensor_bytes']:,}")
    con.print(mix)
    tt = Table(title="tensors")
    for col in ("name", "dtype", "shape", "bytes"):
        tt.add_column(col)
    for t in info["tensors"]:
        tt.add_row(t["name"], t["dtype"], "x".join(map(str, t["shape"])), f"{t['bytes']:,}")
    con.print(tt)
    if "apr" in info:
        from apr_numba.cli.apr_cmds import render_apr

        render_apr(info["apr"])
