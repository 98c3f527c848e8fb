"""Plain NumPy float64 reference forward pass: the in-project numerical oracle.

Written for reading, not speed. Every weight is dequantized with gguf-py
(``gguf.quants.dequantize``, the same routine HF transformers uses when it loads a GGUF) and then widened
to float64; all arithmetic is float64. Function and array names follow the GGUF tensor names
(``blk.N.attn_norm``, ``attn_q``, ``attn_k``, ``attn_v``, ``attn_output``, ``ffn_norm``, ``ffn_gate``,
``ffn_up``, ``ffn_down``, ``output_norm``, ``output`` / ``token_embd``).

It executes the model's :class:`~apr_numba.arch.spec.ArchSpec` (every feature: QK-norm, post-norms, GeGLU,
sliding windows, soft-capping, RoPE frequency factors, mixture-of-experts) with the operations of
:mod:`apr_numba.backends.reference_ops`, and loads exactly the tensors the spec names, checked once by
:func:`apr_numba.model.plan.check_tensors`.

Math of the plain block (decoder-only, pre-norm; HF ``modeling_llama.py`` / ``modeling_qwen2.py``, llama2.c)::

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
(the names of :class:`apr_numba.debug.tracing.SaveTensorStage`) of every block, and takes a fault plan
(:mod:`apr_numba.debug.faults`): ``block(..., faults=BlockFaults)`` swaps in the wrong RoPE base / pairing / eps,
drops the scale / mask / bias, shifts the GQA map, swaps gate and up, or runs the float16-overflowing
softmax; ``load_block(il, plan)`` dequantizes a q4k-scale matrix from its corrupted bytes.
:meth:`ReferenceModel.from_source` reuses an open ``GGUFFile`` (no second metadata parse).

Memory: weights are dequantized block by block while that block runs, embedding rows are dequantized
only for the tokens used, and the lm_head is applied in row chunks, so the peak is about one block's
float64 weights plus a (chunk x D) slice of the lm_head (the 0.5B model runs in well under 1 GB).
``budget_bytes`` keeps dequantized blocks (and lm_head chunks) across calls while they fit, least recently
used first out, so a per-token caller (the dashboard's shadow, :meth:`ReferenceModel.eval` with a
:class:`RefState` KV cache) does not dequantize the whole model per token when memory allows.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from apr_numba.arch.spec import K_NORM, POST_ATTN_NORM, POST_FFN_NORM, Q_NORM, ArchSpec
from apr_numba.arch.stages import STAGE
from apr_numba.arch.traits import ACT_GELU_TANH, FEATURES
from apr_numba.backends.reference_ops import (  # noqa: F401 (rope, softmax... re-exported for tools and tests)
    F16_MAX,
    causal_attention,
    gelu_tanh,
    moe_ffn,
    rms_norm,
    rope,
    silu,
    softmax,
)
from apr_numba.debug.faults import NO_FAULTS, BlockFaults, FaultPlan, corrupted_raw
from apr_numba.errors import ArgumentError, ModelFormatError
from apr_numba.model import plan as tensor_plan
from apr_numba.model.hparams import ModelConfig, gguf_metadata

LM_HEAD_CHUNK = 16384  # rows of the lm_head dequantized at a time (16384 x 896 x 8 B = 117 MB)
IMPLEMENTS = frozenset(FEATURES)  # the reference executes every feature an ArchSpec describes


@dataclass
class RefState:
    """The reference's float64 KV cache: per layer keys and values after RoPE, (n_past, n_kv, head_dim) each,
    grown as tokens arrive, plus ``n_past`` positions (llama.cpp's ``llama_kv_cache`` + ``n_past``)."""

    k: list = field(default_factory=list)
    v: list = field(default_factory=list)
    n_past: int = 0
    n_ctx: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache."""
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)


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


class _ReaderShape:
    """A gguf ReaderTensor seen as a plan source tensor (``shape`` in NumPy order) for ArchSpec.from_metadata."""

    def __init__(self, t) -> None:
        self.shape = tuple(int(n) for n in reversed(t.shape))


class ReferenceModel:
    """float64 NumPy forward of a decoder GGUF, executing its :class:`ArchSpec` (see the module docstring).

    Args:
        path: GGUF file. The file is memory-mapped by ``gguf.GGUFReader``; nothing is dequantized
            until a forward runs.
        budget_bytes: float64 weights kept across calls (least recently used first out); 0 keeps none.

    Raises:
        ModelFormatError: unknown architecture, a tensor missing / misshapen / of an unknown type.
    """

    def __init__(self, path: str | Path, budget_bytes: int = 0) -> None:
        self.path = str(path)
        self.reader = gguf.GGUFReader(self.path)
        tensors = {t.name: _ReaderShape(t) for t in self.reader.tensors}
        spec = ArchSpec.from_metadata(gguf_metadata(self.reader), self.path, tensors)
        self._init(spec, {t.name: t for t in self.reader.tensors}, budget_bytes)

    @classmethod
    def from_source(cls, source, spec: ArchSpec, budget_bytes: int = 0) -> ReferenceModel:
        """The same model over an already-open source (``GGUFFile``: cached metadata, memory-mapped bytes),
        skipping ``GGUFReader``'s parse of the metadata (seconds for a 150k-token vocabulary). Weights are
        still dequantized by gguf-py from the same raw blocks."""
        self = cls.__new__(cls)
        self.path, self.reader = str(source.path), None
        tensor_plan.check_tensors(spec, source)
        self._init(spec, {n: _SourceTensor(source, t) for n, t in source.tensors.items()}, budget_bytes)
        return self

    def _init(self, spec: ArchSpec, tensors: dict, budget_bytes: int) -> None:
        self.spec = spec
        self.config: ModelConfig = spec.hp
        self.tensors = tensors
        for ts in tensor_plan.all_tensors(spec):
            t = tensors.get(ts.name)
            if t is None:
                raise ModelFormatError(f"{self.path}: required tensor {ts.name!r} is missing")
            if tuple(int(n) for n in reversed(t.shape)) != tuple(ts.shape):
                raise ModelFormatError(f"{self.path}: tensor {ts.name} has shape "
                                       f"{tuple(int(n) for n in reversed(t.shape))}, expected {ts.shape}")
        self.lm_head_name = "token_embd.weight" if spec.tied_head else "output.weight"
        self.tied = spec.tied_head
        self.budget_bytes = int(budget_bytes)
        self._cache: OrderedDict = OrderedDict()
        self._cached = 0
        self.freq_factors = self.weight("rope_freqs.weight") if spec.rope_freqs else None

    # ---- weights

    def has(self, name: str) -> bool:
        """True when the GGUF holds tensor ``name``."""
        return name in self.tensors

    def weight(self, name: str) -> np.ndarray:
        """Dequantize GGUF tensor ``name`` to float64; numpy shape is GGUF ``ne`` reversed ((out, in) for a
        matrix, (n_expert, out, in) for expert stacks)."""
        if name not in self.tensors:
            raise ModelFormatError(f"{self.path}: tensor {name!r} is missing")
        shape = tuple(int(n) for n in reversed(self.tensors[name].shape))
        return self._rows(name, slice(None)).reshape(shape)

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
        return w.reshape(-1, shape[-1])

    def _cached_get(self, key, make):
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        val = make()
        size = sum(a.nbytes for a in val.values()) if isinstance(val, dict) else val.nbytes
        if self.budget_bytes and size <= self.budget_bytes:
            while self._cached + size > self.budget_bytes and self._cache:
                _, old = self._cache.popitem(last=False)
                self._cached -= sum(a.nbytes for a in old.values()) if isinstance(old, dict) else old.nbytes
            self._cache[key] = val
            self._cached += size
        return val

    @property
    def cached_bytes(self) -> int:
        """float64 weight bytes held across calls (<= ``budget_bytes``)."""
        return self._cached

    def token_embd(self, token_ids: np.ndarray) -> np.ndarray:
        """Embedding rows for ``token_ids`` (T,), float64 (T, n_embd), times the spec's embedding scale; only
        those rows are dequantized."""
        x = self._rows("token_embd.weight", token_ids)
        return x * self.spec.embed_scale if self.spec.embed_scale != 1.0 else x

    def output(self, x: np.ndarray) -> np.ndarray:
        """lm_head: ``x @ output.T`` for x (T, n_embd) -> (T, n_vocab) float64, in row chunks, then the
        final soft-cap when the spec has one."""
        n_vocab = int(self.tensors[self.lm_head_name].shape[-1])
        logits = np.empty((x.shape[0], n_vocab))
        for r0 in range(0, n_vocab, LM_HEAD_CHUNK):
            r1 = min(r0 + LM_HEAD_CHUNK, n_vocab)
            w = self._cached_get(("head", r0), lambda r0=r0, r1=r1: self._rows(self.lm_head_name, slice(r0, r1)))
            logits[:, r0:r1] = x @ w.T
        cap = self.spec.final_softcap
        return cap * np.tanh(logits / cap) if cap > 0 else logits

    def load_block(self, il: int, plan: FaultPlan | None = None) -> dict[str, np.ndarray]:
        """Dequantize every tensor of block ``il`` the spec names to float64, keyed by the name after
        ``blk.{il}.`` (e.g. ``"attn_q.weight"`` (q_dim, n_embd)). With a q4k-scale ``plan``, the matrices it
        names are dequantized from their corrupted bytes (:func:`apr_numba.debug.faults.corrupted_raw`)."""
        faulty = [slot for layer, slot in (plan.matrices if plan is not None else ()) if layer == il]
        if not faulty:
            return self._cached_get(("blk", il), lambda: self._load_block(il))
        w = dict(self._load_block(il))
        prefix = f"blk.{il}."
        for slot in faulty:
            t = self.tensors[f"{prefix}{slot}.weight"]
            rows, cols = (int(n) for n in reversed(t.shape))
            raw = corrupted_raw(int(t.tensor_type), t.data, (rows, cols)).reshape(rows, -1)
            w[f"{slot}.weight"] = gguf.quants.dequantize(raw, t.tensor_type).astype(np.float64).reshape(rows, cols)
        return w

    def _load_block(self, il: int) -> dict[str, np.ndarray]:
        prefix = f"blk.{il}."
        return {ts.name[len(prefix):]: self.weight(ts.name) for ts in self.spec.block_tensors(il).values()}

    # ---- forward

    def block(self, w: dict[str, np.ndarray], x: np.ndarray, positions: np.ndarray,
              trace: dict | None = None, faults: BlockFaults = NO_FAULTS, layer: int = 0,
              past: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """Run block ``layer`` with weights ``w`` (from :meth:`load_block`) on x (T, n_embd) at ``positions``.

        ``past``: the cached (keys, values) of earlier positions, (P, n_kv, hd) each, positions 0..P-1; the
        new keys and values are then in ``self.last_kv`` (P + T rows). Returns the block output (T, n_embd)
        float64. If ``trace`` is a dict, every per-layer trace stage is stored in it under its aprender name
        (apr_numba.arch.stages), as 2-D (T, width) arrays except ``attn_scores`` / ``attn_softmax``
        (n_head, T, P + T). ``faults``: teaching faults (weight faults come in through ``w``).
        """
        spec, cfg = self.spec, self.config
        t = x.shape[0]
        eps = faults.eps if "rmsnorm-eps" in faults else cfg.rms_eps
        theta = faults.rope_theta if "rope-theta" in faults else spec.layer_rope_base[layer]
        rope_type = spec.rope_type ^ 2 if "rope-style" in faults else spec.rope_type  # NORM 0 <-> NEOX 2
        pos_scale = 1.0 / spec.rope_scaling.factor if spec.rope_scaling.kind == "linear" else 1.0
        st: dict[str, np.ndarray] = {}

        # --- self-attention
        st[STAGE.attn_norm] = attn_norm = rms_norm(x, w["attn_norm.weight"], eps)
        q, k, v = (attn_norm @ w[f"attn_{c}.weight"].T for c in "qkv")  # h @ W.T, W is (out, in)
        st[STAGE.qkv_matmul] = np.concatenate([q, k, v], axis=1)
        if spec.qkv_bias and "qkv-bias-drop" not in faults:
            q, k, v = q + w["attn_q.bias"], k + w["attn_k.bias"], v + w["attn_v.bias"]
        st[STAGE.qkv_bias] = np.concatenate([q, k, v], axis=1)
        q = q.reshape(t, cfg.n_head, cfg.head_dim)
        k = k.reshape(t, cfg.n_head_kv, cfg.head_dim)
        if spec.qk_norm:
            q, k = rms_norm(q, w[Q_NORM], eps), rms_norm(k, w[K_NORM], eps)
        q = rope(q, positions, theta, rope_type, self.freq_factors, pos_scale)
        k = rope(k, positions, theta, rope_type, self.freq_factors, pos_scale)
        st[STAGE.q_post_rope], st[STAGE.k_post_rope] = q.reshape(t, -1), k.reshape(t, -1)
        v = v.reshape(t, cfg.n_head_kv, cfg.head_dim)
        if past is not None:
            k, v = np.concatenate([past[0], k]), np.concatenate([past[1], v])
        self.last_kv = (k, v)
        st[STAGE.attention] = attn = causal_attention(
            q, k, v, faults, st, q_pos=positions, k_pos=np.arange(k.shape[0]), window=spec.layer_window[layer],
            scale=spec.attn_scale, softcap=spec.attn_softcap)
        st[STAGE.attn_out] = attn_out = attn @ w["attn_output.weight"].T
        if spec.post_attn_norm:
            attn_out = rms_norm(attn_out, w[POST_ATTN_NORM], eps)
        st[STAGE.post_attn_residual] = x = x + attn_out

        # --- feed-forward: SwiGLU / GeGLU, or the mixture of experts
        st[STAGE.ffn_norm] = ffn_norm = rms_norm(x, w["ffn_norm.weight"], eps)
        act = gelu_tanh if spec.activation == ACT_GELU_TANH else silu
        if spec.n_expert:
            ffn_out = moe_ffn(ffn_norm, w["ffn_gate_inp.weight"], w["ffn_gate_exps.weight"], w["ffn_up_exps.weight"],
                              w["ffn_down_exps.weight"], spec.n_expert_used, spec.expert_norm, act, st)
        else:
            gate, up = ffn_norm @ w["ffn_gate.weight"].T, ffn_norm @ w["ffn_up.weight"].T
            if "ffn-swap" in faults:
                gate, up = up, gate
            st[STAGE.ffn_gate], st[STAGE.ffn_up] = gate, up
            st[STAGE.ffn_silu] = act(gate)
            st[STAGE.ffn_swigl] = swigl = st[STAGE.ffn_silu] * up
            ffn_out = swigl @ w["ffn_down.weight"].T
        st[STAGE.ffn_out] = ffn_out
        if spec.post_ffn_norm:
            ffn_out = rms_norm(ffn_out, w[POST_FFN_NORM], eps)
        st[STAGE.post_ffn_residual] = out = x + ffn_out
        if trace is not None:
            trace.update(st)
        return out

    def final_norm(self, x: np.ndarray) -> np.ndarray:
        """``rms_norm(x, output_norm)`` (T, n_embd)."""
        return rms_norm(x, self._cached_get(("output_norm",), lambda: self.weight("output_norm.weight")),
                        self.config.rms_eps)

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
            x = self.block(w, x, positions, trace=st if il in rec else None, faults=bf, layer=il)
            out.update({(il, k): v for k, v in st.items()})
            del w
        if whole_model:
            fn = self.final_norm(x)
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

    def new_state(self, n_ctx: int | None = None) -> RefState:
        """An empty float64 KV cache for :meth:`eval` holding up to ``n_ctx`` positions (default: the
        model's training context)."""
        return RefState(n_ctx=int(n_ctx or self.config.n_ctx_train))

    def eval(self, token_ids: Sequence[int], state: RefState, n_logits: int = 1,
             capture_layers: bool = False):
        """Append ``token_ids`` to the sequence cached in ``state`` (positions n_past..) and return logits.

        The same contract as :meth:`apr_numba.model.decoder.Model.eval`, in float64: prefill when
        len > 1, decode when 1; each block reads the cached keys and values of earlier positions.

        Returns:
            logits float64 (n_logits, n_vocab), or (logits, layer_outputs (n_layer, T, n_embd)) with
            ``capture_layers``.

        Raises:
            ArgumentError: empty input, an id outside the vocabulary, or the context is full.
        """
        cfg = self.config
        ids = self._check_ids(token_ids)
        if state.n_past + ids.size > state.n_ctx:
            raise ArgumentError(f"{state.n_past + ids.size} positions exceed the context length {state.n_ctx}")
        positions = np.arange(state.n_past, state.n_past + ids.size)
        x = self.token_embd(ids)
        layer_out = np.empty((cfg.n_layer, ids.size, cfg.n_embd)) if capture_layers else None
        for il in range(cfg.n_layer):
            past = (state.k[il], state.v[il]) if il < len(state.k) else None
            x = self.block(self.load_block(il), x, positions, layer=il, past=past)
            k, v = self.last_kv
            if il < len(state.k):
                state.k[il], state.v[il] = k, v
            else:
                state.k.append(k)
                state.v.append(v)
            if layer_out is not None:
                layer_out[il] = x
        state.n_past += ids.size
        n = max(0, min(int(n_logits), ids.size))
        logits = self.output(self.final_norm(x[ids.size - n:])) if n else np.empty((0, cfg.n_vocab))
        return (logits, layer_out) if capture_layers else logits

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
                xs[s] = self.block(w, xs[s], np.arange(ids.size), layer=il)
                layer_outputs[s][il] = xs[s]
            del w
        final_norms = [self.final_norm(x) for x in xs]
        heads = [fn[-1:] if last_only else fn for fn in final_norms]
        logits = self.output(np.concatenate(heads))  # one pass over the lm_head for all sequences
        out, r0 = [], 0
        for fn, h, lo in zip(final_norms, heads, layer_outputs, strict=True):
            out.append(ReferenceOutput(logits=logits[r0:r0 + h.shape[0]], layer_outputs=lo, final_norm=fn))
            r0 += h.shape[0]
        return out
