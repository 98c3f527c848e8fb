"""The layer plan: which GGUF tensors a decoder needs, their expected shapes, and their packed form.

Tensor names are llama.cpp's (``src/llama-arch.cpp`` LLM_TENSOR_*: ``blk.N.attn_q.weight`` ...), shapes
are NumPy order (out, in). Matrices are repacked once at load (:mod:`apr_numba.quants.repack`);
norms and biases become float32 arrays; ``token_embd`` stays in the memory-mapped file and only looked-up
rows are decoded (:mod:`apr_numba.kernels.embed`). When ``output.weight`` is absent the embedding is tied
and is packed once more as the LM head.

A *source* is anything with ``path``, ``metadata``, ``tensors`` (name -> object with ``ggml_type`` and
``shape``) and ``data(name) -> uint8 array``: :class:`~apr_numba.formats.gguf_file.GGUFFile`, and the .apr reader.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numba import typed

from apr_numba.errors import ModelFormatError
from apr_numba.kernels.embed import EMBED_TYPES
from apr_numba.kernels.matmul import packed_tuple
from apr_numba.model.hparams import ModelConfig
from apr_numba.quants.layouts import decode_codes
from apr_numba.quants.repack import PackedMatrix, pack, pack_raw

# Order of the per-layer matrices in ModelWeights.mats (index = 7 * layer + slot).
LAYER_MATS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
N_MATS = len(LAYER_MATS)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Per-layer tensor suffix -> expected NumPy shape (llama.cpp ``create_tensor`` shapes reversed)."""
    D, F = cfg.n_embd, cfg.n_ff
    return {
        "attn_norm.weight": (D,), "ffn_norm.weight": (D,),
        "attn_q.weight": (cfg.q_dim, D), "attn_k.weight": (cfg.kv_dim, D), "attn_v.weight": (cfg.kv_dim, D),
        "attn_output.weight": (D, cfg.q_dim),
        "ffn_gate.weight": (F, D), "ffn_up.weight": (F, D), "ffn_down.weight": (D, F),
        "attn_q.bias": (cfg.q_dim,), "attn_k.bias": (cfg.kv_dim,), "attn_v.bias": (cfg.kv_dim,),
    }


@dataclass
class ModelWeights:
    """Everything the compiled forward reads, built once at load.

    Attributes:
        mats: numba typed List of kernel tuples (family, rows, q, s, m); index 7*layer + slot
            (slots: LAYER_MATS), then the LM head at 7*n_layer.
        packed: the same matrices as PackedMatrix objects (for inspection, byte counts, tests).
        attn_norm, ffn_norm: float32 (n_layer, n_embd). output_norm: float32 (n_embd,).
        bias_qkv: float32 (n_layer, q_dim + 2 kv_dim), zeros when the model has no QKV bias.
        has_bias: whether the file has QKV biases (qwen2).
        embd_raw: uint8 (n_vocab, row_bytes) zero-copy view of ``token_embd``; embd_type: its GGML type.
        tied: True when the LM head is ``token_embd``.
        quant_mix: GGML type name -> tensor count.
        packed_bytes: resident bytes of the packed matrices.
    """

    config: ModelConfig
    mats: Any
    packed: list[PackedMatrix]
    attn_norm: np.ndarray
    ffn_norm: np.ndarray
    output_norm: np.ndarray
    bias_qkv: np.ndarray
    has_bias: bool
    embd_raw: np.ndarray
    embd_type: int
    tied: bool
    quant_mix: dict[str, int] = field(default_factory=dict)
    packed_bytes: int = 0


def _vector(src, name: str, shape: tuple[int, ...]) -> np.ndarray:
    t = src.tensors.get(name)
    if t is None:
        raise ModelFormatError(f"{src.path}: required tensor {name!r} is missing")
    if tuple(t.shape) != shape:
        raise ModelFormatError(f"{src.path}: tensor {name} has shape {tuple(t.shape)}, expected {shape}")
    codes = decode_codes(t.ggml_type, src.data(name), (1, shape[0]), name)
    return codes.dequantize()[0]


def _matrix(src, name: str, shape: tuple[int, int]) -> PackedMatrix:
    t = src.tensors.get(name)
    if t is None:
        raise ModelFormatError(f"{src.path}: required tensor {name!r} is missing")
    if tuple(t.shape) != shape:
        raise ModelFormatError(f"{src.path}: tensor {name} has shape {tuple(t.shape)}, expected {shape}")
    data = src.data(name)
    try:
        return _pack_tensor(src, name, t, data, shape)
    finally:
        if hasattr(src, "release_tensor") and name != "token_embd.weight":
            src.release_tensor(name)  # packed now: the file's pages need not stay resident (peak RSS)


def _pack_tensor(src, name: str, t, data, shape: tuple[int, int]) -> PackedMatrix:
    fast = pack_raw(t.ggml_type, data, shape) if data.size == shape[0] * _row_bytes(t.ggml_type, shape[1]) else None
    return fast if fast is not None else pack(decode_codes(t.ggml_type, data, shape, f"{src.path}: {name}"))


def _row_bytes(ggml_type: int, cols: int) -> int:
    from gguf import GGML_QUANT_SIZES

    bs, ts = GGML_QUANT_SIZES.get(ggml_type, (1, 0))
    return cols // bs * ts if cols % bs == 0 else -1


def _pack_all(src, jobs: list[tuple[str, tuple[int, int]]], progress: bool) -> list[PackedMatrix]:
    """Decode and pack ``jobs`` (name, shape) in order, on a small thread pool (NumPy releases the GIL
    in the array operations, so packing scales with cores; measured ~2x on 2 cores for qwen2)."""
    from concurrent.futures import ThreadPoolExecutor

    workers = max(1, min(4, os.cpu_count() or 1))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc=f"packing {src.path.name}", unit="tensor", leave=False)
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i][1][0] * jobs[i][1][1])  # biggest first
    out: list[PackedMatrix | None] = [None] * len(jobs)
    with ThreadPoolExecutor(workers) as pool:
        futs = {pool.submit(_matrix, src, *jobs[i]): i for i in order}
        for fut, i in futs.items():
            out[i] = fut.result()
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return out  # type: ignore[return-value]


def load_weights(src, cfg: ModelConfig, progress: bool = False) -> ModelWeights:
    """Validate and pack every tensor the decoder needs.

    Raises:
        ModelFormatError: a required tensor is missing, has the wrong shape, or an unsupported type.
    """
    shapes = expected_shapes(cfg)
    L, D = cfg.n_layer, cfg.n_embd
    attn_norm = np.empty((L, D), np.float32)
    ffn_norm = np.empty((L, D), np.float32)
    has_bias = src.tensors.get("blk.0.attn_q.bias") is not None
    bias = np.zeros((L, cfg.q_dim + 2 * cfg.kv_dim), np.float32)
    for layer in range(L):
        p = f"blk.{layer}."
        attn_norm[layer] = _vector(src, p + "attn_norm.weight", shapes["attn_norm.weight"])
        ffn_norm[layer] = _vector(src, p + "ffn_norm.weight", shapes["ffn_norm.weight"])
        if has_bias:
            bias[layer] = np.concatenate([_vector(src, p + f"attn_{c}.bias", shapes[f"attn_{c}.bias"])
                                          for c in "qkv"])
    emb = src.tensors.get("token_embd.weight")
    if emb is None:
        raise ModelFormatError(f"{src.path}: required tensor 'token_embd.weight' is missing")
    if tuple(emb.shape) != (cfg.n_vocab, D):
        raise ModelFormatError(f"{src.path}: token_embd.weight has shape {tuple(emb.shape)}, "
                               f"expected {(cfg.n_vocab, D)}")
    if emb.ggml_type not in EMBED_TYPES:
        raise ModelFormatError(f"{src.path}: token_embd.weight has unsupported type {emb.ggml_type}")
    tied = src.tensors.get("output.weight") is None
    jobs = [(f"blk.{layer}.{slot}.weight", shapes[slot + ".weight"]) for layer in range(L) for slot in LAYER_MATS]
    jobs.append(("token_embd.weight" if tied else "output.weight", (cfg.n_vocab, D)))
    packed = _pack_all(src, jobs, progress)
    output_norm = _vector(src, "output_norm.weight", (D,))
    embd_raw = np.asarray(src.data("token_embd.weight")).reshape(cfg.n_vocab, -1)

    mats = typed.List()
    for pm in packed:
        mats.append(packed_tuple(pm))
    mix = Counter(t.type_name if hasattr(t, "type_name") else str(t.ggml_type) for t in src.tensors.values())
    return ModelWeights(cfg, mats, packed, attn_norm, ffn_norm, output_norm, bias, has_bias, embd_raw,
                        int(emb.ggml_type), tied, dict(mix), sum(pm.nbytes for pm in packed))
