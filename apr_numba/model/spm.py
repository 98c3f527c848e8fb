"""SentencePiece vocabularies from GGUF (``tokenizer.ggml.model = llama``) built with the ``tokenizers`` library.

A llama-family GGUF stores a SentencePiece model as three arrays: the pieces (``tokenizer.ggml.tokens``,
spelled with the "▁" space marker), their scores (``tokenizer.ggml.scores``) and their types
(``tokenizer.ggml.token_type``: normal 1, unknown 2, control 3, user-defined 4, unused 5, byte 6), plus
``add_bos_token`` / ``add_eos_token`` / ``add_space_prefix``. It stores no merges.

llama.cpp encodes such a vocabulary (``llm_tokenizer_spm`` in ``src/llama-vocab.cpp``,
``LLAMA_VOCAB_TYPE_SPM``) by splitting the text into UTF-8 characters and repeatedly merging the
adjacent pair whose concatenation is a piece of the highest score; a character left that is no piece
becomes its ``<0xNN>`` byte tokens (byte fallback). That is BPE with one merge per way of cutting each
piece into two pieces, ranked by the piece's score. We build exactly the tokenizer transformers builds
from the same file (``transformers/integrations/gguf/gguf_tokenizer_mapping.py``, checked with 5.24,
``sentencepiece_tokenizer`` / ``gemma_tokenizer`` and ``tokenization_utils_base.generate_merges``), since
the project's references are transformers':

* model: ``tokenizers.models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True)`` with the merges of
  :func:`derive_merges` (the file's own ``tokenizer.ggml.merges`` when it has them);
* llama (and every non-gemma architecture): ``Metaspace("▁", prepend_scheme="first")`` (a "▁" is put in
  front of the text's first piece unless it already starts with a space, and spaces become "▁");
  decoder ``Replace("▁", " ")``, ``ByteFallback``, ``Fuse``, ``Strip(1 leading space)``. With
  ``add_space_prefix = false`` no "▁" is prepended and none is stripped (transformers' converter ignores
  the flag for these architectures; llama.cpp honours it, and so do we);
* gemma, gemma2, gemma3 (their files say ``add_space_prefix = false``): merges ranked by the pieces'
  position in the file rather than by score, pieces made only of whitespace (stored with real spaces)
  respelled as that many "▁", normalizer ``Replace(" ", "▁")``, no prefix, decoder without the strip;
* CONTROL pieces, and the unknown/BOS/EOS/padding pieces, are special added tokens and USER_DEFINED
  pieces plain added tokens, matched whole in the text (transformers' ``add_gguf_special_tokens`` and
  the special tokens its tokenizer classes register).

Each piece decodes (``Tokenizer.token_bytes`` / ``stream_decoder``, :func:`piece_bytes`) to its UTF-8 with
"▁" as a space, a ``<0xNN>`` piece to that byte. The stream decoder does not strip the prefix space that
``decode`` strips, so a streamed continuation keeps its leading space.

Known difference from llama.cpp: after a special token in the text llama.cpp prepends another space to
the next piece of text (``is_prev_special``); transformers (and so this module) prepends one only at the
start of the text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from gguf import TokenType
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from apr_numba.errors import ModelFormatError
from apr_numba.model.hparams import meta_value

SPACE = "\u2581"  # "▁", SentencePiece's space marker
GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")

# Metadata that an SPM tokenizer's to_json() keeps; the derived merges are kept too, under _MERGES_KEY.
_SPM_CACHE_KEYS = (
    "general.architecture",
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.eom_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token",
    "tokenizer.ggml.add_space_prefix",
    "tokenizer.chat_template",
)
_MERGES_KEY = "apr_numba.spm_merges"  # cache only: flat [left id, right id, ...] of the merges used

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def derive_merges(tokens: Sequence[str], ranks: Sequence[float]) -> list[int]:
    """BPE merges implied by a SentencePiece vocabulary, best first.

    For every piece, every cut into two pieces of the vocabulary is a merge; merges are sorted by the
    rank of the piece they make (higher first), then by the lengths of the left and right halves (longer
    first), the cuts of one piece in the order of their halves' ids. This is transformers'
    ``generate_merges(vocab, vocab_scores)`` (``tokenization_utils_base.py``), duplicates included
    (the last id of a repeated piece wins, as in a dict), re-implemented for speed: 262,144 pieces in ~1 s.

    Args:
        tokens: the pieces, index = token id.
        ranks: one number per piece: ``tokenizer.ggml.scores``, or ``-position`` for gemma files.

    Returns:
        the merges as a flat list of token ids ``[left0, right0, left1, right1, ...]`` (left/right =
        ``tokens[id]``).
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    rank_of = dict(zip(tokens, ranks, strict=True))
    # Sort keys ascending: (-rank, -len(left), -len(right), order of appearance); Python's stable sort
    # with reverse=True in transformers keeps equal keys in their order of appearance, as seq does here.
    merges: list[tuple[float, int, int, int, int, int]] = []
    seq = 0
    get = vocab.get
    for piece, score in rank_of.items():
        n = len(piece)
        if n < 2:
            continue
        local = []
        for k in range(1, n):
            li = get(piece[:k])
            if li is not None:
                ri = get(piece[k:])
                if ri is not None:
                    local.append((li, ri, k))
        if not local:
            continue
        if len(local) > 1:
            local.sort()
        neg = -score
        for li, ri, k in local:
            merges.append((neg, -k, k - n, seq, li, ri))
            seq += 1
    merges.sort()
    return [i for m in merges for i in m[4:]]


def piece_bytes(piece: str) -> bytes:
    """Bytes a piece decodes to, as the decoder chain (Replace "▁", ByteFallback, Fuse) makes them.

    ``"<0x0A>"`` -> ``b"\\n"``; any other piece -> its UTF-8 with "▁" (U+2581) replaced by a space.
    """
    m = _BYTE_TOKEN.match(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    return piece.replace(SPACE, " ").encode("utf-8")


def _special_id(meta: Mapping[str, Any], key: str, n_vocab: int, source: str) -> int | None:
    tid = meta_value(meta, f"tokenizer.ggml.{key}", "int", source, None)
    if tid is not None and not 0 <= tid < n_vocab:
        raise ModelFormatError(f"{source}: tokenizer.ggml.{key} = {tid} out of range [0, {n_vocab})")
    return tid


def _scores(meta: Mapping[str, Any], n: int, source: str) -> list[float] | None:
    """``tokenizer.ggml.scores`` as floats (None when absent); one per piece, all numbers."""
    key = "tokenizer.ggml.scores"
    val = meta.get(key)
    if val is None:
        return None
    if not isinstance(val, (list, tuple)):
        raise ModelFormatError(f"{source}: {key} is not an array")
    if len(val) != n:
        raise ModelFormatError(f"{source}: {key} has {len(val)} entries for {n} tokens")
    try:
        return [float(x) for x in val]
    except (TypeError, ValueError) as exc:
        raise ModelFormatError(f"{source}: {key} holds non-numbers") from exc


def spm_tokenizer_parts(
    meta: Mapping[str, Any], source: str, eog_tokens: Sequence[str]
) -> tuple[_HFTokenizer, list[str], dict[str, Any], dict[str, Any]]:
    """What :class:`~apr_numba.model.tokenizer.Tokenizer` is built from, for a SentencePiece GGUF vocabulary.

    ``Tokenizer.from_metadata`` calls this for ``tokenizer.ggml.model = llama`` (this module does not
    import the tokenizer module: no import cycle).

    Args:
        meta: GGUF metadata (key -> Python value); reads the ``tokenizer.*`` keys and
            ``general.architecture`` (gemma files rank merges by position, see the module doc).
        source: file name used in error messages.
        eog_tokens: piece spellings that end a turn when the vocabulary has them as CONTROL pieces
            (added to ``eos_ids``).

    Returns:
        ``(hf, pieces, kept_meta, kwargs)``: the ``tokenizers.Tokenizer``; the pieces as looked up (gemma's
        whitespace pieces respelled); the metadata ``to_json`` keeps (with the derived merges, so that a
        start-up cache hit does not derive them again); the remaining keyword arguments of the
        ``Tokenizer`` constructor (special ids, ``add_bos``/``add_eos``, ``pre_type``, ``piece_bytes``...).

    Raises:
        ModelFormatError: no or empty ``tokenizer.ggml.tokens``, non-string pieces, scores or token
            types of the wrong length, neither scores nor merges, a special id out of range,
            ``add_bos_token`` without a BOS id, a non-string chat template; the message names ``source``.
    """
    tokens = meta_value(meta, "tokenizer.ggml.tokens", "str_list", source, None)
    if not tokens:
        raise ModelFormatError(f"{source}: tokenizer metadata 'tokenizer.ggml.tokens' is missing or empty")
    tokens = list(tokens)
    n_vocab = len(tokens)
    scores = _scores(meta, n_vocab, source)
    token_type = meta_value(meta, "tokenizer.ggml.token_type", "int_list", source, None)
    if token_type is None:
        token_type = [TokenType.NORMAL] * n_vocab
    elif len(token_type) != n_vocab:
        raise ModelFormatError(
            f"{source}: tokenizer.ggml.token_type has {len(token_type)} entries for {n_vocab} tokens")
    arch = meta_value(meta, "general.architecture", "str", source, None)
    gemma = arch in GEMMA_ARCHS
    add_prefix = meta_value(meta, "tokenizer.ggml.add_space_prefix", "bool", source, True) and not gemma
    stored = tokens
    if gemma:  # whitespace-only pieces are stored with real spaces; the merges are built on "▁" spellings
        tokens = [SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
    ids = {k: _special_id(meta, f"{k}_token_id", n_vocab, source)
           for k in ("bos", "eos", "unknown", "padding", "eot", "eom")}
    add_bos = meta_value(meta, "tokenizer.ggml.add_bos_token", "bool", source, True)  # llama.cpp's SPM default
    if add_bos and ids["bos"] is None:
        if "tokenizer.ggml.add_bos_token" in meta:
            raise ModelFormatError(f"{source}: tokenizer.ggml.add_bos_token is set but there is no bos_token_id")
        add_bos = False
    add_eos = meta_value(meta, "tokenizer.ggml.add_eos_token", "bool", source, False)
    if add_eos and ids["eos"] is None:
        raise ModelFormatError(f"{source}: tokenizer.ggml.add_eos_token is set but there is no eos_token_id")
    chat_template = meta_value(meta, "tokenizer.chat_template", "str", source, None)
    pre_type = meta_value(meta, "tokenizer.ggml.pre", "str", source, "default")

    vocab = {t: i for i, t in enumerate(tokens)}
    flat = None
    if meta.get(_MERGES_KEY) is not None:  # from our own cache
        flat = meta[_MERGES_KEY]
    elif meta_value(meta, "tokenizer.ggml.merges", "str_list", source, None):
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    elif gemma:
        flat = derive_merges(tokens, range(0, -n_vocab, -1))
    elif scores is not None:
        flat = derive_merges(tokens, scores)
    else:
        raise ModelFormatError(f"{source}: SentencePiece vocabulary has neither tokenizer.ggml.scores nor merges")
    if flat is not None:
        try:
            merges = [(tokens[a], tokens[b]) for a, b in zip(flat[::2], flat[1::2], strict=True)]
        except (TypeError, IndexError, ValueError) as exc:
            raise ModelFormatError(f"{source}: bad cached SentencePiece merges ({exc})") from exc

    unk = tokens[ids["unknown"]] if ids["unknown"] is not None and gemma else None
    try:
        bpe = models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    except Exception as exc:  # tokenizers raises plain Exception on merges that do not fit the vocabulary
        raise ModelFormatError(f"{source}: invalid SentencePiece merges: {exc}") from exc
    hf = _HFTokenizer(bpe)
    chain = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        hf.normalizer = normalizers.Replace(" ", SPACE)
        hf.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    else:
        scheme = "first" if add_prefix else "never"
        hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme=scheme, split=False)
        if add_prefix:
            chain.append(decoders.Strip(" ", 1, 0))
    hf.decoder = decoders.Sequence(chain)

    # transformers adds the pieces as the file spells them (not respelled); a user-defined piece only if
    # that spelling is in the vocabulary. GemmaTokenizer also registers "<mask>" as a special token.
    named = {ids[k] for k in ("unknown", "bos", "eos", "padding") if ids[k] is not None}
    if gemma and "<mask>" in vocab:
        named.add(vocab["<mask>"])
    control = [i for i, t in enumerate(token_type) if t == TokenType.CONTROL]
    specials = sorted(set(control) | named)
    special_set = set(specials)
    user = [i for i, t in enumerate(token_type)
            if t == TokenType.USER_DEFINED and i not in special_set and stored[i] in vocab]
    hf.add_special_tokens([AddedToken(stored[i], normalized=False, special=True) for i in specials])
    if user:
        hf.add_tokens([AddedToken(stored[i], normalized=False, special=False) for i in user])

    eos_set = {i for i in (ids["eos"], ids["eot"], ids["eom"]) if i is not None}
    control_set = set(control)
    for name in eog_tokens:
        i = vocab.get(name)
        if i is not None and i in control_set:
            eos_set.add(i)

    keep = {k: meta[k] for k in _SPM_CACHE_KEYS if k in meta}
    if flat is not None:
        keep[_MERGES_KEY] = flat
    kwargs = dict(
        pre_type=pre_type,
        bos_id=ids["bos"],
        eos_id=ids["eos"],
        pad_id=ids["padding"],
        unk_id=ids["unknown"],
        eos_ids=frozenset(eos_set),
        special_ids=frozenset(specials),
        add_bos=add_bos,
        chat_template=chat_template,
        add_eos=add_eos,
        piece_bytes=piece_bytes,
    )
    return hf, tokens, keep, kwargs
