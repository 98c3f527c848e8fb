"""BERT-style encoders (``all-MiniLM-L6-v2`` = registry ``minilm-l6``) on the Numba kernels.

Math: HF ``modeling_bert.py``: ``BertEmbeddings`` (word + token type + absolute position, LayerNorm),
then per layer ``BertSelfAttention`` (bidirectional, key padding mask) -> ``BertSelfOutput``
(``LayerNorm(dense(ctx) + x)``) -> ``BertIntermediate`` (dense, exact erf GELU) -> ``BertOutput``
(``LayerNorm(dense(h) + x)``). No pooler: ``last_hidden_state`` is the output (the kernels and their
sources are in :mod:`apr_numba.kernels.encoder`). Dropout is the identity (inference).

Weights come from a *source* whose tensors carry HF names (``encoder.layer.0.attention.self.query.weight``
..., optionally prefixed ``bert.``; TF-era ``LayerNorm.gamma/beta`` are accepted): a HF directory
(:class:`~apr_numba.formats.safetensors_dir.SafetensorsDir`) or an ``.apr`` file from ``apr-numba import`` through
:func:`open_encoder_source`. Matrices are packed with :func:`apr_numba.quants.repack.pack` (F32 kept exact,
F16/BF16 widened exactly, GGML-quantized types decoded losslessly) and multiplied by
:func:`apr_numba.kernels.matmul.matmul3`; Q, K and V share one parallel region.

Batches are *ragged*: the real tokens of all texts are stacked (no padding is computed), so a text's
output is bit-identical whether it runs alone or in any batch (every reduction is per row, in an order
fixed by that row and its own sequence). :meth:`EncoderModel.forward` takes and returns the padded
(batch, seq) layout with an attention mask for callers that want it.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from apr_numba import runtime as _config
from apr_numba.encoder.weights import (
    TOKENIZER_KEYS,
    Dense,
    EncoderConfig,
    EncoderWeights,
    load_encoder_weights,
    meta_value,
    open_encoder_source,
    source_config,
)
from apr_numba.errors import ArgumentError, ModelFormatError
from apr_numba.kernels import encoder as K
from apr_numba.kernels.matmul import matmul3


class TruncationWarning(UserWarning):
    """A text was longer than the encoder's positions and was cut (``truncate=True``)."""


def _dense(out: np.ndarray, x: np.ndarray, d: Dense) -> None:
    """out (T, R) <- x (T, C) @ W.T + bias for a :class:`~apr_numba.encoder.weights.Dense`."""
    if d.w is not None:
        K.linear(out, x, d.w, d.bias)
        return
    t = d.tuples
    matmul3(out, x, t[0], t[1 % len(t)], t[2 % len(t)], len(t))
    K.add_bias(out, d.bias)


def _starts(lengths: np.ndarray) -> np.ndarray:
    """First row (int64 (B,)) of each sequence in the ragged layout, from per-sequence lengths."""
    start = np.zeros(len(lengths), np.int64)
    if len(lengths) > 1:
        start[1:] = np.cumsum(lengths)[:-1]
    return start


class EncoderModel:
    """A loaded BERT-style encoder.

    Attributes:
        path, source, config (:class:`EncoderConfig`), tokenizer (``tokenizers.Tokenizer``, its own
        truncation and padding disabled), weights (:class:`EncoderWeights`), threads, load_s, n_layer,
        hidden_size, max_length (= positions).
    """

    def __init__(self, source, cfg: EncoderConfig, tokenizer, weights: EncoderWeights, threads: int):
        self.source, self.path, self.config = source, Path(source.path), cfg
        self.tokenizer, self.weights, self.threads = tokenizer, weights, threads
        self.load_s = 0.0
        self._trunc: dict[int, Any] = {}

    n_layer = property(lambda self: self.config.n_layer)
    hidden_size = property(lambda self: self.config.n_embd)
    max_length = property(lambda self: self.config.n_pos)

    # -- tokenizer -------------------------------------------------------------------------
    def tokenize(self, texts, max_length: int | None = None, truncate: bool = True) -> list[np.ndarray]:
        """Token ids (with [CLS] ... [SEP]) of each text, int64 arrays; see :func:`apr_numba.embed`.

        Raises:
            ArgumentError: empty list, a non-string item (index and type named), bad max_length, or
                (``truncate=False``) a text longer than max_length (index and token count named).
        """
        from apr_numba.encoder.texts import check_texts

        texts = check_texts(texts)
        ml = self.config.n_pos if max_length is None else int(max_length)
        n_special = self.tokenizer.num_special_tokens_to_add(False)
        if not n_special < ml <= self.config.n_pos:
            raise ArgumentError(f"max_length must be in [{n_special + 1}, {self.config.n_pos}], got {ml}")
        ids = [np.asarray(e.ids, np.int64) for e in self.tokenizer.encode_batch(texts)]
        for i, x in enumerate(ids):
            if len(x) <= ml:
                continue
            if not truncate:
                raise ArgumentError(f"text {i} has {len(x)} tokens, more than max_length {ml}; "
                                    f"shorten it or allow truncation (truncate=True, --truncate)")
            warnings.warn(f"text {i}: {len(x)} tokens truncated to {ml}", TruncationWarning, stacklevel=3)
            if ml not in self._trunc:
                t = self.tokenizer.from_str(self.tokenizer.to_str())
                t.enable_truncation(ml)
                self._trunc[ml] = t
            ids[i] = np.asarray(self._trunc[ml].encode(texts[i]).ids, np.int64)
        return ids

    # -- forward ---------------------------------------------------------------------------
    def _check_ids(self, ids, types, name: str, check_len: bool = True) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(ids)
        if x.ndim != 1 or x.size == 0 or not np.issubdtype(x.dtype, np.integer):
            raise ArgumentError(f"{name}: expected a non-empty 1-D sequence of token ids, got {x.dtype} {x.shape}")
        x = x.astype(np.int64)
        if x.min() < 0 or x.max() >= self.config.n_vocab:
            raise ArgumentError(f"{name}: token id out of range [0, {self.config.n_vocab})")
        if check_len and x.size > self.config.n_pos:
            raise ArgumentError(f"{name}: {x.size} tokens exceed the {self.config.n_pos} positions")
        t = np.zeros_like(x) if types is None else np.asarray(types).astype(np.int64).reshape(-1)
        if t.shape != x.shape or (t.size and (t.min() < 0 or t.max() >= self.config.n_types)):
            raise ArgumentError(f"{name}: token_type_ids must be {x.shape} in [0, {self.config.n_types})")
        return x, t

    def embed_rows(self, ids: np.ndarray, pos: np.ndarray, types: np.ndarray) -> np.ndarray:
        """``BertEmbeddings`` output (N, D) float32 for validated int64 (N,) ids, positions, types."""
        w = self.weights
        out = np.empty((ids.size, self.config.n_embd), np.float32)
        K.embed_layernorm(out, ids, pos, types, w.word, w.pos, w.types, w.emb_ln_w, w.emb_ln_b, self.config.eps)
        return out

    def run_layers(self, x: np.ndarray, lengths, capture_layers: bool = False):
        """Run every layer on ragged rows x (N, D) float32 (in place); lengths: real tokens per sequence.

        Returns x, or (x, layers) with layers (n_layer + 1, N, D) float32: entry 0 the input, entry k the
        output of layer k-1 (HF ``output_hidden_states`` order).
        """
        c = self.config
        lengths = np.asarray(lengths, np.int64)
        start = _starts(lengths)
        N, D = x.shape
        qkv, ctx = np.empty((N, 3 * D), np.float32), np.empty((N, D), np.float32)
        tmp, h = np.empty((N, D), np.float32), np.empty((N, c.n_ff), np.float32)
        cap = np.empty((c.n_layer + 1, N, D), np.float32) if capture_layers else None
        if cap is not None:
            cap[0] = x
        for i, lw in enumerate(self.weights.layers):
            _dense(qkv, x, lw.qkv)
            K.attention_bidir(ctx, qkv, start, lengths, c.n_head, c.head_dim)
            _dense(tmp, ctx, lw.o)
            K.add_layernorm(x, tmp, lw.ln1_w, lw.ln1_b, c.eps)
            _dense(h, x, lw.inter)
            K.gelu(h)
            _dense(tmp, h, lw.out)
            K.add_layernorm(x, tmp, lw.ln2_w, lw.ln2_b, c.eps)
            if cap is not None:
                cap[i + 1] = x
        return (x, cap) if capture_layers else x

    def encode_ragged(self, seqs, token_types=None, capture_layers: bool = False):
        """Encoder output of several id sequences stacked without padding.

        Returns (x (N, D) float32, lengths int64 (B,)) or, with capture_layers, (x, lengths, layers).

        Raises:
            ArgumentError: no sequences, or a sequence that is empty / out of range / too long.
        """
        if len(seqs) == 0:
            raise ArgumentError("no sequences to encode")
        checked = [self._check_ids(s, None if token_types is None else token_types[b], f"sequence {b}")
                   for b, s in enumerate(seqs)]
        lengths = np.array([len(s) for s, _ in checked], np.int64)
        ids = np.concatenate([s for s, _ in checked])
        types = np.concatenate([t for _, t in checked])
        pos = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])
        res = self.run_layers(self.embed_rows(ids, pos, types), lengths, capture_layers)
        return (res[0], lengths, res[1]) if capture_layers else (res, lengths)

    def encode_hidden(self, ids, token_type_ids=None) -> np.ndarray:
        """last_hidden_state float32 (seq, hidden) of one id sequence (no padding).

        Raises:
            ArgumentError: empty, out-of-range ids or token types, longer than the positions.
        """
        return self.encode_ragged([ids], None if token_type_ids is None else [token_type_ids])[0]

    def _padded(self, rows: np.ndarray, mask: np.ndarray, out: np.ndarray) -> np.ndarray:
        out[mask] = rows
        return out

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, capture_layers: bool = False):
        """Padded-batch forward: input_ids int (B, S) or (S,), attention_mask 0/1 (B, S) (default all 1).

        Positions are absolute (0..S-1, as HF's default ``position_ids``) whatever the mask; masked keys
        are left out of attention. Returns last_hidden_state float32 (B, S, D) with zeros on masked rows
        (HF computes values there that no pooling reads), or (that, layers (n_layer+1, B, S, D)).

        Raises:
            ArgumentError: bad shapes, out-of-range ids/types, S > positions.
        """
        ids = np.atleast_2d(np.asarray(input_ids))
        B, S = ids.shape
        mask = np.ones((B, S), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
        types = np.zeros((B, S), np.int64) if token_type_ids is None else np.atleast_2d(np.asarray(token_type_ids))
        if mask.shape != (B, S) or types.shape != (B, S) or S > self.config.n_pos:
            raise ArgumentError(f"input_ids {ids.shape}, attention_mask {mask.shape}, token_type_ids "
                                f"{types.shape} must agree and have at most {self.config.n_pos} positions")
        flat_ids, flat_t = self._check_ids(ids.reshape(-1), types.reshape(-1), "input_ids", False)
        sel = mask.reshape(-1)
        pos = np.broadcast_to(np.arange(S, dtype=np.int64), (B, S)).reshape(-1)[sel].copy()
        x = self.embed_rows(flat_ids[sel].copy(), pos, flat_t[sel].copy())
        res = self.run_layers(x, mask.sum(1), capture_layers)
        D = self.config.n_embd
        if not capture_layers:
            return self._padded(res, mask, np.zeros((B, S, D), np.float32))
        layers = np.zeros((self.config.n_layer + 1, B, S, D), np.float32)
        for k in range(layers.shape[0]):
            self._padded(res[1][k], mask, layers[k])
        return layers[-1].copy(), layers

    def forward_embeddings(self, x, attention_mask=None, capture_layers: bool = False):
        """Run the layers on given embeddings x float (B, S, D) or (S, D) (the input of layer 0, i.e. after
        the embeddings' LayerNorm), for shape/finiteness gates. Returns the same shape (zeros on masked
        rows) float32, or (that, layers) as :meth:`forward`.

        Raises:
            ArgumentError: x is not (B, S, D) / (S, D) with D = hidden size, or the mask disagrees.
        """
        a = np.asarray(x, np.float32)
        squeeze = a.ndim == 2
        a = a[None] if squeeze else a
        if a.ndim != 3 or a.shape[2] != self.config.n_embd or a.shape[1] == 0:
            raise ArgumentError(f"x must be (batch, seq, {self.config.n_embd}), got {np.shape(x)}")
        B, S, D = a.shape
        mask = np.ones((B, S), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
        if mask.shape != (B, S):
            raise ArgumentError(f"attention_mask must be {(B, S)}, got {mask.shape}")
        res = self.run_layers(np.ascontiguousarray(a[mask]), mask.sum(1), capture_layers)
        hid = res[0] if capture_layers else res
        out = self._padded(hid, mask, np.zeros((B, S, D), np.float32))
        if capture_layers:
            layers = np.zeros((self.config.n_layer + 1, B, S, D), np.float32)
            for k in range(layers.shape[0]):
                self._padded(res[1][k], mask, layers[k])
            return (out[0], layers[:, 0]) if squeeze else (out, layers)
        return out[0] if squeeze else out

    def __repr__(self) -> str:
        c = self.config
        return (f"EncoderModel({self.path.name}: {c.arch}, {c.n_layer} layers, d={c.n_embd}, {c.n_head} heads, "
                f"ff {c.n_ff}, vocab {c.n_vocab}, positions {c.n_pos}, threads={self.threads})")


def load_encoder(model, threads: int | None = None, warmup: bool = True) -> EncoderModel:
    """Load an encoder: an :class:`EncoderModel` (returned as is), a registry name (``"minilm-l6"``,
    pulled if missing), a HF model directory, or an ``.apr`` file.

    Raises:
        ArgumentError: unknown model name, bad threads.
        ModelFormatError: missing/malformed config, tokenizer or tensors (named).
        PullError: a registry model could not be fetched.
    """
    if isinstance(model, EncoderModel):
        return model
    from tokenizers import Tokenizer

    from apr_numba.hub.pull import resolve_model

    _config.configure_threading()
    nthreads = _config.set_threads(threads)
    t0 = time.perf_counter()
    path = resolve_model(model, progress=False)
    src = open_encoder_source(path)
    cfg = EncoderConfig.from_hf(source_config(src), f"{path}")
    tok_json = getattr(src, "tokenizer_json", None) or meta_value(src, TOKENIZER_KEYS)
    if not tok_json:
        raise ModelFormatError(f"{path}: no tokenizer (tokenizer.json) in this model")
    try:
        tok = Tokenizer.from_str(tok_json if isinstance(tok_json, str) else json.dumps(tok_json))
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exception
        raise ModelFormatError(f"{path}: tokenizer.json cannot be loaded ({exc})") from exc
    tok.no_truncation()
    tok.no_padding()
    m = EncoderModel(src, cfg, tok, load_encoder_weights(src, cfg), nthreads)
    if warmup:
        m.encode_hidden(tok.encode("").ids or [0])
    m.load_s = time.perf_counter() - t0
    return m
