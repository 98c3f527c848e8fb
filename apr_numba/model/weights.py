"""The Numba CPU backend's weights: the tensors an :class:`~apr_numba.arch.spec.ArchSpec` names, in packed form.

Which tensors and shapes is the spec's (:meth:`ArchSpec.block_tensors`), checked once by
:func:`apr_numba.model.plan.check_tensors`. Matrices are repacked once at load (:mod:`apr_numba.quants.repack`);
norms and biases become float32 arrays; ``token_embd`` stays in the memory-mapped file and only looked-up
rows are decoded (:mod:`apr_numba.kernels.embed`). When ``output.weight`` is absent the embedding is tied
and is packed once more as the LM head.

A *source*: see :mod:`apr_numba.model.plan`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from apr_numba.arch.spec import ArchSpec
from apr_numba.errors import ModelFormatError
from apr_numba.kernels.embed import EMBED_TYPES
from apr_numba.kernels.matmul import packed_list, packed_tuple
from apr_numba.model import plan
from apr_numba.model.hparams import ModelConfig
from apr_numba.quants.layouts import decode_codes
from apr_numba.quants.repack import PackedMatrix, pack, pack_raw
from apr_numba.quants.vnni_pack import activation_mode, to_vnni

# Order of the per-layer matrices in ModelWeights.mats (index = 7 * layer + slot).
LAYER_MATS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
N_MATS = len(LAYER_MATS)


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
        q_norm, k_norm: float32 (n_layer, head_dim) QK-norm weights, (n_layer, 0) without QK-norm.
        post_attn_norm, post_ffn_norm: float32 (n_layer, n_embd) post-norm weights, (n_layer, 0) without.
        spec: the :class:`ArchSpec` these weights follow.
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
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None
    post_attn_norm: np.ndarray | None = None
    post_ffn_norm: np.ndarray | None = None
    spec: ArchSpec | None = None
    experts: Any = None

    def kernel_args(self, mats=None) -> tuple:
        """The compiled forward's weights tuple ``w`` (see :func:`apr_numba.backends.cpu_forward.forward`);
        ``mats`` replaces the packed matrices (the q4k-scale teaching fault)."""
        return (self.mats if mats is None else mats, self.embd_raw, np.int64(self.embd_type), self.attn_norm,
                self.ffn_norm, self.bias_qkv, self.output_norm, self.q_norm, self.k_norm, self.post_attn_norm,
                self.post_ffn_norm, self.mats if self.experts is None else self.experts)


def _matrix(src, ts, threads: int = 1) -> PackedMatrix:
    t = plan.tensor(src, ts)
    data = src.data(ts.name)
    try:
        return _pack_tensor(src, ts.name, t, data, ts.shape, threads)
    finally:
        if hasattr(src, "release_tensor") and ts.name != "token_embd.weight":
            src.release_tensor(ts.name)  # packed now: the file's pages need not stay resident (peak RSS)


def _pack_tensor(src, name: str, t, data, shape: tuple[int, int], threads: int = 1) -> PackedMatrix:
    ok = data.size == shape[0] * _row_bytes(t.ggml_type, shape[1])
    fast = pack_raw(t.ggml_type, data, shape, threads=threads) if ok else None
    pm = fast if fast is not None else pack(decode_codes(t.ggml_type, data, shape, f"{src.path}: {name}"))
    return to_vnni(pm) if activation_mode() == "int8" else pm


def _row_bytes(ggml_type: int, cols: int) -> int:
    from gguf import GGML_QUANT_SIZES

    bs, ts = GGML_QUANT_SIZES.get(ggml_type, (1, 0))
    return cols // bs * ts if cols % bs == 0 else -1


def _pack_all(src, jobs: list, progress: bool) -> list[PackedMatrix]:
    """Pack ``jobs`` (TensorSpecs) in order, on a thread pool of the kernel thread count (``numba.get_num_threads()``,
    i.e. ``threads`` of :func:`~apr_numba.model.decoder.load`): the raw-block packers
    (:func:`~apr_numba.quants.repack.pack_raw`) are serial ``nogil`` Numba, so tensors pack side by side, one per
    core."""
    from concurrent.futures import ThreadPoolExecutor

    import numba

    workers = max(1, min(numba.get_num_threads(), len(jobs)))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc=f"packing {src.path.name}", unit="tensor", leave=False)
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i].shape[0] * jobs[i].shape[1])  # biggest first
    out: list[PackedMatrix | None] = [None] * len(jobs)
    with ThreadPoolExecutor(workers) as pool:
        futs = {pool.submit(_matrix, src, jobs[i], workers): i for i in order}
        for fut, i in futs.items():
            out[i] = fut.result()
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return out  # type: ignore[return-value]


def _pack_experts(src, spec: ArchSpec):
    """Typed List of every expert's (gate, up, down) packed matrices, index 3 * (layer * n_expert + e) + j.

    An expert stack ``blk.N.ffn_{gate,up,down}_exps.weight`` (n_expert, rows, cols) stores expert e's rows
    contiguously (GGUF ne [cols, rows, n_expert]), so each expert packs on its own like a 2-D matrix.
    """
    out = []
    E = spec.n_expert
    for layer in range(spec.hp.n_layer):
        b = spec.block_tensors(layer)
        stacks = []
        for s in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            ts = b[s + ".weight"]
            t = plan.tensor(src, ts)
            stacks.append((t, np.asarray(src.data(ts.name)).reshape(E, -1), ts.shape[1:]))
        for e in range(E):
            for t, raw, shape in stacks:
                out.append(packed_tuple(_pack_tensor(src, t.name, t, raw[e], shape)))
        for s in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            if hasattr(src, "release_tensor"):
                src.release_tensor(b[s + ".weight"].name)
    return packed_list(out)


def _stack(src, spec: ArchSpec, suffix: str, width: int, on: bool) -> np.ndarray:
    """float32 (n_layer, width) of one per-layer vector, or (n_layer, 0) when the feature is off."""
    L = spec.hp.n_layer
    if not on:
        return np.zeros((L, 0), np.float32)
    return np.stack([plan.vector(src, spec.block_tensors(il)[suffix]) for il in range(L)]).astype(np.float32)


def load_weights(src, spec: ArchSpec, progress: bool = False) -> ModelWeights:
    """Check and pack every tensor the description needs.

    Raises:
        ModelFormatError: a required tensor is missing, has the wrong shape, or an unsupported type.
    """
    from apr_numba.arch.spec import K_NORM, POST_ATTN_NORM, POST_FFN_NORM, Q_NORM
    from apr_numba.backends.cpu_forward import IMPLEMENTS

    spec.require("cpu", IMPLEMENTS, str(src.path))
    plan.check_tensors(spec, src)
    cfg = spec.hp
    L, D = cfg.n_layer, cfg.n_embd
    attn_norm = _stack(src, spec, "attn_norm.weight", D, True)
    ffn_norm = _stack(src, spec, "ffn_norm.weight", D, True)
    bias = np.zeros((L, cfg.q_dim + 2 * cfg.kv_dim), np.float32)
    if spec.qkv_bias:
        for layer in range(L):
            b = spec.block_tensors(layer)
            bias[layer] = np.concatenate([plan.vector(src, b[f"attn_{c}.bias"]) for c in "qkv"])
    mt = spec.model_tensors()
    emb = plan.tensor(src, mt["token_embd.weight"])
    if emb.ggml_type not in EMBED_TYPES:
        raise ModelFormatError(f"{src.path}: token_embd.weight has unsupported type {emb.ggml_type}")
    def slot_tensor(layer: int, slot: str):
        b = spec.block_tensors(layer)
        if spec.n_expert and slot in ("ffn_gate", "ffn_up", "ffn_down"):
            return b["ffn_gate_inp.weight"]  # a MoE layer: slot 4 is the router, 5 and 6 repeat it (never read)
        return b[slot + ".weight"]

    jobs = [slot_tensor(layer, slot) for layer in range(L) for slot in LAYER_MATS]
    jobs.append(mt["token_embd.weight"] if spec.tied_head else mt["output.weight"])
    packed = _pack_all(src, jobs, progress)
    experts = _pack_experts(src, spec) if spec.n_expert else None
    output_norm = plan.vector(src, mt["output_norm.weight"])
    embd_raw = np.asarray(src.data("token_embd.weight")).reshape(cfg.n_vocab, -1)

    mats = packed_list(packed_tuple(pm) for pm in packed)
    mix = Counter(t.type_name if hasattr(t, "type_name") else str(t.ggml_type) for t in src.tensors.values())
    return ModelWeights(cfg, mats, packed, attn_norm, ffn_norm, output_norm, bias, spec.qkv_bias, embd_raw,
                        int(emb.ggml_type), spec.tied_head, dict(mix), sum(pm.nbytes for pm in packed),
                        q_norm=_stack(src, spec, Q_NORM, cfg.head_dim, spec.qk_norm),
                        k_norm=_stack(src, spec, K_NORM, cfg.head_dim, spec.qk_norm),
                        post_attn_norm=_stack(src, spec, POST_ATTN_NORM, D, spec.post_attn_norm),
                        post_ffn_norm=_stack(src, spec, POST_FFN_NORM, D, spec.post_ffn_norm), spec=spec,
                        experts=experts)
