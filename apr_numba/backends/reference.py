"""Plain NumPy float64 reference forward pass: the in-project numerical oracle.

Written for reading, not speed. Every weight is dequantized with gguf-py
(``gguf.quants.dequantize``, the same routine HF transformers uses when it loads a GGUF) and then widened
to float64; all arithmetic is float64. Function and array names follow the GGUF tensor names
(``blk.N.attn_norm``, ``attn_q``, ``attn_k``, ``attn_v``, ``attn_output``, ``ffn_norm``, ``ffn_gate``,
``ffn_up``, ``ffn_down``, ``output_norm``, ``output`` / ``token_embd``).

Math (decoder-only, pre-norm; HF ``modeling_llama.py`` / ``modeling_qwen2.py``, karpathy ``llama2.c``)::

    x   = token_embd[ids]                                              (T, D)
    for each block N:
        h   = rms_norm(x, attn_norm)
        q   = h @ attn_q.T (+ attn_q.bias);  k, v likewise             (T, H*hd), (T, Hkv*hd)
        q,k = rope(q), rope(k)
        a   = softmax(q k^T / sqrt(hd) + causal_mask) v, query head h uses kv head h // (H/Hkv)
        x   = x + a @ attn_output.T
        h   = rms_norm(x, ffn_norm)
        x   = x + (silu(h @ ffn_gate.T) * (h @ ffn_up.T)) @ ffn_down.T  <- layer_outputs[N]
    logits = rms_norm(x, output_norm) @ output.T     (output = token_embd when tied)

    rms_norm(x, w) = x / sqrt(mean(x^2) + eps) * w
    rope: theta_i = base^(-2i/hd), angle = p * theta_i for position p, i in [0, hd/2);
          ROPE_NORM (llama GGUF) rotates pairs (2i, 2i+1),
          ROPE_NEOX (qwen2)      rotates pairs (i, i + hd/2) (HF rotate_half).

The llama GGUF converter permutes attn_q / attn_k rows per head so that NORM RoPE on the GGUF layout
equals HF's rotate_half on the HF layout (see ``tests/fixtures/make_hf_fixtures.py``); so no
de-permutation is done here: GGUF layout + NORM RoPE gives the same logits as HF.

Tracing and teaching faults: :meth:`ReferenceModel.forward_traced` records every aprender trace stage
(the names of :class:`apr_numba.debug.trace.SaveTensorStage`) of every block, and takes a fault plan
(:mod:`apr_numba.debug.faults`): ``block(..., faults=BlockFaults)`` swaps in the wrong RoPE base / pairing / eps,
drops the scale / mask / bias, shifts the GQA map, swaps gate and up, or runs the float16-overflowing
softmax; ``load_block(il, plan)`` dequantizes a q4k-scale matrix from its corrupted bytes.
:meth:`ReferenceModel.from_source` reuses an open ``GGUFFile`` (no second metadata parse).

Memory: weights are dequantized block by block while that block runs, embedding rows are dequantized
only for the tokens used, and the lm_head is applied in row chunks, so the peak is about one block's
float64 weights plus a (chunk x D) slice of the lm_head (the 0.5B model runs in well under 1 GB).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from apr_numba.debug.faults import NO_FAULTS, BlockFaults, FaultPlan, corrupted_raw
from apr_numba.errors import ArgumentError, ModelFormatError
from apr_numba.model.hparams import ROPE_NEOX, ROPE_NORM, ModelConfig, gguf_metadata

LM_HEAD_CHUNK = 16384  # rows of the lm_head dequantized at a time (16384 x 896 x 8 B = 117 MB)
F16_MAX = 65504.0  # largest finite float16 (softmax-no-max fault)


@dataclass
class ReferenceOutput:
    """Result of :meth:`ReferenceModel.forward`; all arrays float64.

    Attributes:
        logits: (T, n_vocab), or (1, n_vocab) for ``last_only``: ``output @ final_norm[t]``.
        layer_outputs: (n_layer, T, n_embd): each block's output after the FFN residual
            (aprender stage ``post_ffn_residual``; HF ``hidden_states[N + 1]`` for N < n_layer - 1).
        final_norm: (T, n_embd): ``rms_norm(layer_outputs[-1], output_norm)`` (HF ``hidden_states[-1]``).
    """

    logits: np.ndarray
    layer_outputs: np.ndarray
    final_norm: np.ndarray


# ---------------------------------------------------------------------------------------------- math


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis: ``x / sqrt(mean(x^2) + eps) * weight`` (HF LlamaRMSNorm)."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def silu(x: np.ndarray) -> np.ndarray:
    """SiLU / swish: ``x * sigmoid(x)``."""
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax; ``-inf`` entries get probability 0."""
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def rope(x: np.ndarray, positions: np.ndarray, theta_base: float, rope_type: int) -> np.ndarray:
    """Rotary position embedding.

    Args:
        x: (T, n_heads, head_dim) queries or keys.
        positions: (T,) integer positions p.
        theta_base: RoPE frequency base (``{arch}.rope.freq_base``).
        rope_type: ROPE_NORM rotates (x[2i], x[2i+1]); ROPE_NEOX rotates (x[i], x[i + head_dim/2]).

    Returns:
        (T, n_heads, head_dim) float64 with each pair (a, b) rotated by angle p * theta_i,
        theta_i = base^(-2i/head_dim): (a cos - b sin, a sin + b cos).
    """
    hd = x.shape[-1]
    inv_freq = theta_base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)  # (hd/2,)
    angle = positions.astype(np.float64)[:, None] * inv_freq[None, :]  # (T, hd/2)
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]  # broadcast over heads
    if rope_type == ROPE_NORM:
        a, b = x[..., 0::2], x[..., 1::2]
    elif rope_type == ROPE_NEOX:
        a, b = x[..., : hd // 2], x[..., hd // 2:]
    else:
        raise ModelFormatError(f"unknown rope_type {rope_type}")
    out = np.empty_like(x, dtype=np.float64)
    ra, rb = a * cos - b * sin, a * sin + b * cos
    if rope_type == ROPE_NORM:
        out[..., 0::2], out[..., 1::2] = ra, rb
    else:
        out[..., : hd // 2], out[..., hd // 2:] = ra, rb
    return out


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, faults: BlockFaults = NO_FAULTS,
                     trace: dict | None = None) -> np.ndarray:
    """Causal multi-head attention with grouped-query KV heads.

    Args:
        q: (T, n_head, hd); k, v: (T, n_head_kv, hd), n_head a multiple of n_head_kv.
        faults: teaching faults of this block (apr_numba.debug.faults): ``attn-scale`` drops 1/sqrt(hd),
            ``causal-mask-off`` removes the mask, ``gqa-map`` reads kv head (h // n_rep + 1) % n_kv,
            ``softmax-no-max`` skips the max subtraction, holds e^s in float32 (a row whose every e^s
            underflows gives 0/0 = NaN) and overflows like float16 (e^s > 65504 -> inf, inf/inf = NaN).
        trace: if a dict, ``attn_scores`` (scaled, before the mask, shown with zeros above the diagonal)
            and ``attn_softmax`` are stored in it, each (n_head, T, T).

    Returns:
        (T, n_head * hd): per head ``softmax(q k^T / sqrt(hd) + mask) v``, where query head h reads
        kv head ``h // (n_head / n_head_kv)`` (HF ``repeat_kv``) and the mask forbids t' > t.
    """
    t, n_head, hd = q.shape
    n_kv = k.shape[1]
    n_rep = n_head // n_kv
    mask = np.triu(np.full((t, t), -np.inf), k=1)  # (T, T): -inf above the diagonal
    if "causal-mask-off" in faults:
        mask = np.zeros((t, t))
    scale = 1.0 if "attn-scale" in faults else 1.0 / math.sqrt(hd)
    out = np.empty((t, n_head, hd))
    all_scores, all_probs = np.zeros((n_head, t, t)), np.empty((n_head, t, t))
    for h in range(n_head):
        kv = h // n_rep
        if "gqa-map" in faults:
            kv = (kv + 1) % n_kv
        scores = q[:, h, :] @ k[:, kv, :].T * scale  # (T, T), before the mask
        if "softmax-no-max" in faults:  # the faulty kernels: no max subtraction, exp held in float32
            with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
                e = np.exp(scores + mask).astype(np.float32).astype(np.float64)  # (underflow -> 0: 0/0 = NaN)
                e[e > F16_MAX] = np.inf  # and overflowing like float16
                probs = np.where(np.isneginf(mask), 0.0, e / np.sum(e, axis=-1, keepdims=True))  # masked: 0
        else:
            probs = softmax(scores + mask, axis=-1)
        all_scores[h] = np.tril(scores)
        all_probs[h] = probs
        out[:, h, :] = probs @ v[:, kv, :]
    if trace is not None:
        trace.update(attn_scores=all_scores, attn_softmax=all_probs)
    return out.reshape(t, n_head * hd)


# --------------------------------------------------------------------------------------------- model


class _SourceTensor:
    """A ``gguf.ReaderTensor`` look-alike over a source's tensor (``name``, ``tensor_type``, ``shape`` in GGUF
    ne order, ``data``: float arrays for F32/F16, else uint8 (rows, bytes per row))."""

    def __init__(self, source, ref) -> None:
        self.source, self.name, self.tensor_type = source, ref.name, ref.ggml_type
        self.shape = tuple(reversed(ref.shape))

    @property
    def data(self) -> np.ndarray:
        raw = np.asarray(self.source.data(self.name))
        shape = tuple(reversed(self.shape))
        if self.tensor_type == gguf.GGMLQuantizationType.F32:
            return raw.view(np.float32).reshape(shape)
        if self.tensor_type == gguf.GGMLQuantizationType.F16:
            return raw.view(np.float16).reshape(shape)
        return raw.reshape(-1) if len(shape) == 1 else raw.reshape(int(np.prod(shape[:-1])), -1)


class ReferenceModel:
    """float64 NumPy forward of a llama / qwen2 GGUF (see the module docstring for the math).

    Args:
        path: GGUF file. The file is memory-mapped by ``gguf.GGUFReader``; nothing is dequantized
            until :meth:`forward` runs.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.reader = gguf.GGUFReader(self.path)
        self.config: ModelConfig = ModelConfig.from_metadata(gguf_metadata(self.reader), self.path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        for name in ("token_embd.weight", "output_norm.weight"):
            if name not in self.tensors:
                raise ModelFormatError(f"{self.path}: tensor {name!r} is missing")
        # lm_head: ``output.weight`` or, when absent, the tied ``token_embd.weight``
        self.lm_head_name = "output.weight" if "output.weight" in self.tensors else "token_embd.weight"
        self.tied = self.lm_head_name == "token_embd.weight"

    @classmethod
    def from_source(cls, source, config: ModelConfig) -> ReferenceModel:
        """The same model over an already-open source (``GGUFFile``: cached metadata, memory-mapped bytes),
        skipping ``GGUFReader``'s parse of the metadata (seconds for a 150k-token vocabulary). Weights are
        still dequantized by gguf-py from the same raw blocks."""
        self = cls.__new__(cls)
        self.path, self.reader, self.config = str(source.path), None, config
        self.tensors = {n: _SourceTensor(source, t) for n, t in source.tensors.items()}
        for name in ("token_embd.weight", "output_norm.weight"):
            if name not in self.tensors:
                raise ModelFormatError(f"{self.path}: tensor {name!r} is missing")
        self.lm_head_name = "output.weight" if "output.weight" in self.tensors else "token_embd.weight"
        self.tied = self.lm_head_name == "token_embd.weight"
        return self

    # ---- weights

    def has(self, name: str) -> bool:
        """True when the GGUF holds tensor ``name``."""
        return name in self.tensors

    def weight(self, name: str) -> np.ndarray:
        """Dequantize GGUF tensor ``name`` to float64; numpy shape is GGUF ``ne`` reversed, (out, in)."""
        if name not in self.tensors:
            raise ModelFormatError(f"{self.path}: tensor {name!r} is missing")
        return self._rows(name, slice(None))

    def _rows(self, name: str, rows: slice | np.ndarray) -> np.ndarray:
        """Dequantize rows ``rows`` of a 2-D (or all of a 1-D) tensor to float64.

        Quantized tensors are stored row-major as (rows, bytes per row) with whole blocks per row, so
        any subset of rows dequantizes independently.
        """
        t = self.tensors[name]
        data = t.data if t.data.ndim == 1 else t.data[rows]
        w = gguf.quants.dequantize(np.ascontiguousarray(data), t.tensor_type).astype(np.float64)
        shape = tuple(int(n) for n in reversed(t.shape))
        if len(shape) == 1:
            return w.reshape(shape)
        return w.reshape(-1, shape[1])

    def token_embd(self, token_ids: np.ndarray) -> np.ndarray:
        """Embedding rows for ``token_ids`` (T,), float64 (T, n_embd); only those rows are dequantized."""
        return self._rows("token_embd.weight", token_ids)

    def output(self, x: np.ndarray) -> np.ndarray:
        """lm_head: ``x @ output.T`` for x (T, n_embd) -> (T, n_vocab) float64, in row chunks."""
        n_vocab = int(self.tensors[self.lm_head_name].shape[-1])
        logits = np.empty((x.shape[0], n_vocab))
        for r0 in range(0, n_vocab, LM_HEAD_CHUNK):
            r1 = min(r0 + LM_HEAD_CHUNK, n_vocab)
            logits[:, r0:r1] = x @ self._rows(self.lm_head_name, slice(r0, r1)).T
        return logits

    def load_block(self, il: int, plan: FaultPlan | None = None) -> dict[str, np.ndarray]:
        """Dequantize every tensor of block ``il`` to float64, keyed by the name after ``blk.{il}.``

        (e.g. ``"attn_q.weight"`` (q_dim, n_embd), ``"attn_q.bias"`` (q_dim,) when present). With a
        q4k-scale ``plan``, the matrices it names are dequantized from their corrupted bytes
        (:func:`apr_numba.debug.faults.corrupted_raw`).
        """
        prefix = f"blk.{il}."
        w = {n[len(prefix):]: self.weight(n) for n in self.tensors if n.startswith(prefix)}
        for layer, slot in (plan.matrices if plan is not None else ()):
            if layer == il:
                t = self.tensors[f"{prefix}{slot}.weight"]
                rows, cols = (int(n) for n in reversed(t.shape))
                raw = corrupted_raw(int(t.tensor_type), t.data, (rows, cols)).reshape(rows, -1)
                w[f"{slot}.weight"] = gguf.quants.dequantize(raw, t.tensor_type).astype(np.float64).reshape(rows, cols)
        return w

    # ---- forward

    def block(self, w: dict[str, np.ndarray], x: np.ndarray, positions: np.ndarray,
              trace: dict | None = None, faults: BlockFaults = NO_FAULTS) -> np.ndarray:
        """Run one transformer block with weights ``w`` (from :meth:`load_block`) on x (T, n_embd).

        Returns the block output (T, n_embd) float64. If ``trace`` is a dict, every per-layer trace stage
        is stored in it under its aprender name (apr_numba.debug.trace.SaveTensorStage), as 2-D (T, width)
        arrays except ``attn_scores`` / ``attn_softmax`` (n_head, T, T). ``faults``: teaching faults of
        this block (apr_numba.debug.faults.BlockFaults; weight faults come in through ``w``).
        """
        cfg = self.config
        t = x.shape[0]
        eps = faults.eps if "rmsnorm-eps" in faults else cfg.rms_eps
        theta = faults.rope_theta if "rope-theta" in faults else cfg.rope_theta
        rope_type = cfg.rope_type ^ 2 if "rope-style" in faults else cfg.rope_type  # NORM 0 <-> NEOX 2
        st: dict[str, np.ndarray] = {}

        # --- self-attention
        st["attn_norm"] = attn_norm = rms_norm(x, w["attn_norm.weight"], eps)
        q, k, v = (attn_norm @ w[f"attn_{c}.weight"].T for c in "qkv")  # h @ W.T, W is (out, in)
        st["qkv_matmul"] = np.concatenate([q, k, v], axis=1)
        if "attn_q.bias" in w and "qkv-bias-drop" not in faults:
            q, k, v = q + w["attn_q.bias"], k + w["attn_k.bias"], v + w["attn_v.bias"]
        st["qkv_bias"] = np.concatenate([q, k, v], axis=1)
        q = rope(q.reshape(t, cfg.n_head, cfg.head_dim), positions, theta, rope_type)
        k = rope(k.reshape(t, cfg.n_head_kv, cfg.head_dim), positions, theta, rope_type)
        st["q_post_rope"], st["k_post_rope"] = q.reshape(t, -1), k.reshape(t, -1)
        st["attention"] = attn = causal_attention(q, k, v.reshape(t, cfg.n_head_kv, cfg.head_dim), faults, st)
        st["attn_out"] = attn_out = attn @ w["attn_output.weight"].T
        st["post_attn_residual"] = x = x + attn_out

        # --- SwiGLU feed-forward
        st["ffn_norm"] = ffn_norm = rms_norm(x, w["ffn_norm.weight"], eps)
        gate, up = ffn_norm @ w["ffn_gate.weight"].T, ffn_norm @ w["ffn_up.weight"].T
        if "ffn-swap" in faults:
            gate, up = up, gate
        st["ffn_gate"], st["ffn_up"] = gate, up
        st["ffn_silu"] = silu(gate)
        st["ffn_swigl"] = swigl = st["ffn_silu"] * up
        st["ffn_out"] = ffn_out = swigl @ w["ffn_down.weight"].T
        st["post_ffn_residual"] = out = x + ffn_out
        if trace is not None:
            trace.update(st)
        return out

    def forward_traced(self, token_ids: Sequence[int], layers: Sequence[int] | None = None,
                       whole_model: bool = True, plan: FaultPlan | None = None) -> dict:
        """Forward of one sequence at positions 0..T-1 recording every trace stage.

        Args:
            token_ids: T >= 1 ids.
            layers: layers whose stages are recorded (default all); blocks past the last one are skipped
                when ``whole_model`` is False.
            whole_model: also run the final norm and the lm_head (T rows) and record them.
            plan: a teaching fault (apr_numba.debug.faults.plan_fault) to inject.

        Returns:
            {(layer, stage): float64 array}, layer None for final_norm / lm_head; ``embedding`` is
            recorded as layer 0's. Shapes as in :meth:`block`; lm_head (T, n_vocab).
        """
        cfg = self.config
        ids = self._check_ids(token_ids)
        rec = set(range(cfg.n_layer) if layers is None else layers)
        last = cfg.n_layer - 1 if whole_model or not rec else max(rec)
        out: dict = {}
        x = self.token_embd(ids)
        if 0 in rec:
            out[(0, "embedding")] = x
        positions = np.arange(ids.size)
        for il in range(last + 1):
            w = self.load_block(il, plan)
            st: dict = {}
            bf = plan.block_faults(il) if plan is not None else NO_FAULTS
            x = self.block(w, x, positions, trace=st if il in rec else None, faults=bf)
            out.update({(il, k): v for k, v in st.items()})
            del w
        if whole_model:
            fn = rms_norm(x, self.weight("output_norm.weight"), cfg.rms_eps)
            out[(None, "final_norm")] = fn
            out[(None, "lm_head")] = self.output(fn)
        return out

    def _check_ids(self, seq: Sequence[int]) -> np.ndarray:
        n_vocab = int(self.tensors["token_embd.weight"].shape[-1])
        ids = np.asarray(seq, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ArgumentError("token_ids is empty")
        if ids.min() < 0 or ids.max() >= n_vocab:
            raise ArgumentError(f"token id out of range [0, {n_vocab}): {ids.min()}..{ids.max()}")
        return ids

    def forward(self, token_ids: Sequence[int], last_only: bool = False) -> ReferenceOutput:
        """Full-sequence forward at positions 0..T-1 (no KV cache).

        Args:
            token_ids: T >= 1 token ids in [0, n_vocab).
            last_only: compute logits for the last position only ((1, n_vocab)).

        Returns:
            :class:`ReferenceOutput` (float64 logits, per-block outputs, final norm).

        Raises:
            ArgumentError: empty input or an id outside the vocabulary.
        """
        return self.forward_many([token_ids], last_only=last_only)[0]

    def forward_many(
        self, sequences: Sequence[Sequence[int]], last_only: bool = False
    ) -> list[ReferenceOutput]:
        """:meth:`forward` for several independent sequences, dequantizing each block only once.

        Each sequence is its own causal context at positions 0..T_s-1 (not a batch with padding).
        """
        cfg = self.config
        ids_list = [self._check_ids(seq) for seq in sequences]

        xs = [self.token_embd(ids) for ids in ids_list]  # each (T_s, D)
        layer_outputs = [np.empty((cfg.n_layer, ids.size, cfg.n_embd)) for ids in ids_list]
        for il in range(cfg.n_layer):
            w = self.load_block(il)  # this block's float64 weights, freed after the loop step
            for s, ids in enumerate(ids_list):
                xs[s] = self.block(w, xs[s], np.arange(ids.size))
                layer_outputs[s][il] = xs[s]
            del w
        norm_w = self.weight("output_norm.weight")
        final_norms = [rms_norm(x, norm_w, cfg.rms_eps) for x in xs]
        heads = [fn[-1:] if last_only else fn for fn in final_norms]
        logits = self.output(np.concatenate(heads))  # one pass over the lm_head for all sequences
        out, r0 = [], 0
        for fn, h, lo in zip(final_norms, heads, layer_outputs, strict=True):
            out.append(ReferenceOutput(logits=logits[r0:r0 + h.shape[0]], layer_outputs=lo, final_norm=fn))
            r0 += h.shape[0]
        return out
