"""Sentence embeddings: ``apr_numba.embed(model, texts, pooling="mean"|"cls", normalize=True)``.

Recipe (sentence-transformers ``Transformer -> Pooling -> Normalize``, the modules listed in
all-MiniLM-L6-v2's ``modules.json``):

* mean pooling (``Pooling(pooling_mode_mean_tokens=True)``): ``sum_t h_t m_t / max(sum_t m_t, 1e-9)``
  over the attention mask m, i.e. over the real tokens, [CLS] and [SEP] included; summed in float64.
* CLS pooling: row 0 of the encoder output, bit for bit.
* ``Normalize``: ``x / max(||x||_2, 1e-12)`` (``torch.nn.functional.normalize``), norm in float64.

Texts longer than ``max_length`` tokens (default: the model's positions, 512 for BERT; note that
sentence-transformers cuts all-MiniLM-L6-v2 at its ``max_seq_length`` 256, pass ``max_length=256``
for that) are cut with a :class:`~apr_numba.encoder.model.TruncationWarning` (``truncate=True``) or refused
with :class:`~apr_numba.errors.ArgumentError` (``truncate=False``).

A batch is ragged (no padding computed), so every text's embedding is bit-identical to embedding it
alone, for any ``batch_size``.
"""

from __future__ import annotations

import numpy as np

from apr_numba.encoder.texts import check_texts
from apr_numba.errors import ArgumentError
from apr_numba.kernels.encoder import mean_pool

POOLINGS = ("mean", "cls")


def pool(x: np.ndarray, lengths: np.ndarray, pooling: str = "mean", normalize: bool = True) -> np.ndarray:
    """Pool ragged encoder rows x (N, D) float32 with per-text lengths (B,) into (B, D) float32.

    Raises:
        ArgumentError: unknown pooling.
    """
    if pooling not in POOLINGS:
        raise ArgumentError(f"unknown pooling {pooling!r} (choose from {', '.join(POOLINGS)})")
    lengths = np.asarray(lengths, np.int64)
    start = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    if pooling == "cls":
        out = x[start].copy()
    else:
        out = np.empty((len(lengths), x.shape[1]), np.float32)
        mean_pool(out, x, start, lengths)
    if normalize:
        n = np.sqrt(np.sum(out.astype(np.float64) ** 2, axis=1, keepdims=True))
        out = (out / np.maximum(n, 1e-12)).astype(np.float32)
    return out


def embed_ids(model, ids: list, pooling: str = "mean", normalize: bool = True, batch_size: int = 32) -> np.ndarray:
    """Embeddings float32 (len(ids), hidden) of token id sequences (each with its [CLS] ... [SEP]).

    Raises:
        ArgumentError: unknown pooling, batch_size < 1, an empty / out-of-range / too long sequence.
    """
    if pooling not in POOLINGS:
        raise ArgumentError(f"unknown pooling {pooling!r} (choose from {', '.join(POOLINGS)})")
    if int(batch_size) < 1:
        raise ArgumentError(f"batch_size must be >= 1, got {batch_size}")
    if len(ids) == 0:
        raise ArgumentError("no texts to embed (empty list)")
    out = np.empty((len(ids), model.hidden_size), np.float32)
    for b0 in range(0, len(ids), int(batch_size)):
        chunk = ids[b0:b0 + int(batch_size)]
        x, lengths = model.encode_ragged(chunk)
        out[b0:b0 + len(chunk)] = pool(x, lengths, pooling, normalize)
    return out


def embed(model, texts, pooling: str = "mean", normalize: bool = True, *, batch_size: int = 32,
          max_length: int | None = None, truncate: bool = True, threads: int | None = None) -> np.ndarray:
    """Sentence embeddings float32 (n_texts, hidden) of ``texts`` (see the module docstring).

    Args:
        model: an :class:`~apr_numba.encoder.model.EncoderModel`, a registry name (``"minilm-l6"``), a HF model
            directory or an ``.apr`` file (loaded with :func:`~apr_numba.encoder.model.load_encoder`).
        texts: list of str (a single str is one text).
        pooling: "mean" (sentence-transformers' default for MiniLM) or "cls".
        normalize: L2-normalise each embedding.
        batch_size: texts per forward (memory only: results do not depend on it).
        max_length: token limit incl. [CLS]/[SEP] (default: the model's positions).
        truncate: cut longer texts with a warning (True) or raise (False).
        threads: kernel threads when ``model`` is loaded here.

    Raises:
        ArgumentError: empty list, non-str item, unknown pooling, bad max_length/batch_size, a text too long
            with ``truncate=False`` (its index and token count named).
        ModelFormatError, PullError: loading the model failed.
    """
    from apr_numba.encoder.model import load_encoder

    if pooling not in POOLINGS:
        raise ArgumentError(f"unknown pooling {pooling!r} (choose from {', '.join(POOLINGS)})")
    texts = check_texts(texts)
    m = load_encoder(model, threads=threads)
    ids = m.tokenize(texts, max_length=max_length, truncate=truncate)
    return embed_ids(m, ids, pooling, normalize, batch_size)
