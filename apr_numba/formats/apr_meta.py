"""Names and metadata between GGUF's conventions and aprender's APR v2 ones (both directions).

Tensor names (aprender's import map, ``shared/docs/aprender-facts.md``): ``blk.N.attn_q.weight`` <->
``model.layers.N.self_attn.q_proj.weight`` (k, v, o and the biases alike), ``attn_norm`` <->
``input_layernorm``, ``ffn_gate/up/down`` <-> ``mlp.gate_proj/up_proj/down_proj``, ``ffn_norm`` <->
``post_attention_layernorm``, ``token_embd.weight`` <-> ``model.embed_tokens.weight``, ``output.weight``
<-> ``lm_head.weight``, ``output_norm.weight`` <-> ``model.norm.weight``. Other names are kept.

Metadata: aprender's named keys (``hidden_size``, ``num_layers``... ``chat_template``,
``special_tokens``) and, flat at the top level as realizar reads them, the custom keys
``tokenizer.vocabulary``, ``tokenizer.merges``, ``tokenizer.bos_token_id``, ``tokenizer.eos_token_id``,
``tokenizer.model``, ``tokenizer.pre_type``, ``tied_embeddings``. Every other ``tokenizer.ggml.X`` GGUF
key is stored as ``tokenizer.X`` (``token_type``, ``padding_token_id``, ``add_bos_token``...), and
every other GGUF key K as ``gguf.K``, so that nothing of the GGUF is lost and the ``.apr`` alone runs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from apr_numba.errors import ModelFormatError
from apr_numba.model.hparams import SUPPORTED_ARCHS

_LAYER_MAP = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_norm": "input_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "ffn_norm": "post_attention_layernorm",
}
_LAYER_UNMAP = {v: k for k, v in _LAYER_MAP.items()}
_GLOBAL_MAP = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
               "output_norm.weight": "model.norm.weight"}
_GLOBAL_UNMAP = {v: k for k, v in _GLOBAL_MAP.items()}
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.([a-z_.]+)\.(weight|bias)$")


def gguf_to_apr_name(name: str) -> str:
    """aprender's name for GGUF tensor ``name`` (unmapped names returned unchanged)."""
    if name in _GLOBAL_MAP:
        return _GLOBAL_MAP[name]
    m = _GGUF_LAYER.match(name)
    if m and m.group(2) in _LAYER_MAP:
        return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.{m.group(3)}"
    return name


def apr_to_gguf_name(name: str) -> str:
    """The GGUF name the loader uses for a stored name in either convention (others unchanged)."""
    if name in _GLOBAL_UNMAP:
        return _GLOBAL_UNMAP[name]
    m = _HF_LAYER.match(name)
    if m and m.group(2) in _LAYER_UNMAP:
        return f"blk.{m.group(1)}.{_LAYER_UNMAP[m.group(2)]}.{m.group(3)}"
    return name


# aprender key -> GGUF key suffix after "{arch}." (config values).
_CONFIG_KEYS = {
    "num_layers": "block_count", "hidden_size": "embedding_length", "num_heads": "attention.head_count",
    "num_kv_heads": "attention.head_count_kv", "intermediate_size": "feed_forward_length",
    "max_position_embeddings": "context_length", "rope_theta": "rope.freq_base",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon", "vocab_size": "vocab_size",
    "head_dim": "attention.key_length",
}
# tokenizer.ggml.X <-> tokenizer.Y renames (everything else keeps its suffix).
_TOK_RENAME = {"tokens": "vocabulary", "pre": "pre_type"}
_TOK_UNRENAME = {v: k for k, v in _TOK_RENAME.items()}
_SPECIAL = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "padding_token_id",
            "unk_token_id": "unknown_token_id"}
# aprender spells the byte-level BPE model "bpe"; GGUF (and this project's tokenizer) "gpt2".
_TOK_MODEL_ALIASES = {"bpe": "gpt2"}


def jsonable(v: Any) -> Any:
    """``v`` with NumPy scalars / arrays turned into Python values and tuples into lists."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return v


def gguf_to_apr_metadata(meta: Mapping[str, Any], *, source: str, n_vocab: int | None, tied: bool,
                         dtype_counts: Mapping[str, int]) -> dict[str, Any]:
    """APR metadata (aprender key names, custom keys flat) for a GGUF file's metadata.

    Args:
        meta: GGUF key -> value, with the tokenizer arrays (``GGUFFile(..., use_cache=False).metadata``).
        source: the source file name (``source`` key). n_vocab: row count of ``token_embd`` (fallback).
        tied: whether the LM head is the embedding (``tied_embeddings``).
        dtype_counts: dtype name -> tensor count (``quantization.tensor_types``).
    """
    arch = meta.get("general.architecture")
    out: dict[str, Any] = {}

    def put(key: str, val: Any) -> None:
        if val is not None:
            out[key] = jsonable(val)

    put("model_type", arch)
    put("name", meta.get("general.name"))
    put("architecture", arch)
    used = {"general.architecture", "general.name"}
    for akey, suffix in _CONFIG_KEYS.items():
        gkey = f"{arch}.{suffix}"
        if gkey in meta:
            put(akey, meta[gkey])
            used.add(gkey)
    if "num_kv_heads" not in out and "num_heads" in out:
        out["num_kv_heads"] = out["num_heads"]
    if "vocab_size" not in out:
        toks = meta.get("tokenizer.ggml.tokens")
        put("vocab_size", len(toks) if toks is not None else n_vocab)
    if "head_dim" not in out and out.get("num_heads") and out.get("hidden_size"):
        out["head_dim"] = int(out["hidden_size"]) // int(out["num_heads"])
    if arch in SUPPORTED_ARCHS:
        out["rope_type"] = SUPPORTED_ARCHS[arch]
    put("chat_template", meta.get("tokenizer.chat_template"))
    used.add("tokenizer.chat_template")
    special = {k: jsonable(meta[f"tokenizer.ggml.{g}"]) for k, g in _SPECIAL.items() if f"tokenizer.ggml.{g}" in meta}
    if special:
        out["special_tokens"] = special
    out["source"] = source
    out["original_format"] = "gguf"
    quant = {"tensor_types": dict(dtype_counts)}
    if "general.file_type" in meta:
        quant["gguf_file_type"] = jsonable(meta["general.file_type"])
    out["quantization"] = quant
    for key, val in meta.items():
        if key in used:
            continue
        if key.startswith("tokenizer.ggml."):
            suffix = key[len("tokenizer.ggml."):]
            put(f"tokenizer.{_TOK_RENAME.get(suffix, suffix)}", val)
        else:
            put(f"gguf.{key}", val)
    out["tied_embeddings"] = bool(tied)
    return out


_FLOAT_KEYS = ("rope_theta", "rms_norm_eps")


def _check_number(akey: str, label: str, val: Any, source: str) -> None:
    is_float = akey in _FLOAT_KEYS
    ok = (isinstance(val, (int, float)) if is_float else isinstance(val, int) and 0 < val < 1 << 31) and \
        not isinstance(val, bool)
    if not ok:
        kind = "a number" if is_float else "an integer in [1, 2**31)"
        raise ModelFormatError(f"{source}: metadata {label} must be {kind}, got {str(val)[:80]!r}")


def apr_to_gguf_metadata(apr: Mapping[str, Any], source: str = "model") -> dict[str, Any]:
    """GGUF-convention metadata (what :class:`~apr_numba.model.hparams.ModelConfig` and
    :class:`~apr_numba.model.tokenizer.Tokenizer` read) for APR metadata written by this project or by
    aprender. Custom keys are read flat at the top level or inside a ``custom`` object. Config values
    must be JSON numbers (integers in [1, 2**31) for sizes and counts) and tokenizer values of their JSON type (lists
    of strings, list of integers, integer ids...); ranges are checked by the consumers.

    Raises:
        ModelFormatError: a config or tokenizer value of the wrong JSON type; the message names ``source``.
    """
    src: dict[str, Any] = {}
    custom = apr.get("custom")
    if isinstance(custom, dict):
        src.update(custom)
    src.update(apr)
    out: dict[str, Any] = {}
    arch = src.get("architecture") or src.get("model_type")
    if isinstance(arch, str):
        out["general.architecture"] = arch
        for akey, suffix in _CONFIG_KEYS.items():
            if src.get(akey) is not None:
                out[f"{arch}.{suffix}"] = src[akey]
    if isinstance(src.get("name"), str):
        out["general.name"] = src["name"]
    if isinstance(src.get("chat_template"), str):
        out["tokenizer.chat_template"] = src["chat_template"]
    special = src.get("special_tokens")
    if isinstance(special, dict):
        for k, g in _SPECIAL.items():
            if special.get(k) is not None:
                out[f"tokenizer.ggml.{g}"] = special[k]
    for key, val in src.items():
        if key.startswith("tokenizer.") and val is not None:
            suffix = key[len("tokenizer."):]
            out[f"tokenizer.ggml.{_TOK_UNRENAME.get(suffix, suffix)}"] = val
    model = out.get("tokenizer.ggml.model")
    if isinstance(model, str):
        out["tokenizer.ggml.model"] = _TOK_MODEL_ALIASES.get(model, model)
    for key, val in src.items():
        if key.startswith("gguf.") and key[5:] not in out:
            out[key[5:]] = val
    if isinstance(arch, str):
        for akey, suffix in _CONFIG_KEYS.items():
            if out.get(f"{arch}.{suffix}") is not None:
                _check_number(akey, f"'{akey}' ('{arch}.{suffix}')", out[f"{arch}.{suffix}"], source)
    for key, check, kind in _TOKENIZER_TYPES:
        if out.get(key) is not None and not check(out[key]):
            raise ModelFormatError(f"{source}: metadata {key!r} must be {kind}, got {str(out[key])[:80]!r}")
    return out


def _list_of(t: type) -> Any:
    return lambda v: isinstance(v, list) and all(isinstance(x, t) and not isinstance(x, bool) for x in v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# GGUF tokenizer key -> type check (values copied from the file are checked before the tokenizer uses them).
_TOKENIZER_TYPES = [
    ("tokenizer.ggml.tokens", _list_of(str), "a list of strings"),
    ("tokenizer.ggml.merges", _list_of(str), "a list of strings"),
    ("tokenizer.ggml.token_type", _list_of(int), "a list of integers"),
    ("tokenizer.ggml.model", lambda v: isinstance(v, str), "a string"),
    ("tokenizer.ggml.pre", lambda v: isinstance(v, str), "a string"),
    ("tokenizer.chat_template", lambda v: isinstance(v, str), "a string"),
    ("tokenizer.ggml.add_bos_token", lambda v: isinstance(v, bool), "true or false"),
] + [(f"tokenizer.ggml.{k}", _is_int, "an integer") for k in ("bos_token_id", "eos_token_id", "padding_token_id",
                                                               "unknown_token_id", "eot_token_id", "eom_token_id")]
