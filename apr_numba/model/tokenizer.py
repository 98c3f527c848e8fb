"""Byte-level BPE tokenizer built from GGUF metadata with the ``tokenizers`` library.

A GGUF file carries no ``tokenizer.json``: it stores the vocabulary (``tokenizer.ggml.tokens``), the
merges (``tokenizer.ggml.merges``), the token types (``tokenizer.ggml.token_type``), the name of the
pre-tokenizer (``tokenizer.ggml.pre``) and the special token ids under llama.cpp's key names. This
module rebuilds the same tokenizer the model was trained with:

* model: ``tokenizers.models.BPE`` over the file's vocabulary and merges (``tokenizer.ggml.model`` must
  be ``gpt2``, i.e. byte-level BPE);
* pre-tokenizer: chosen by ``tokenizer.ggml.pre``, mirroring the split regexes of llama.cpp
  (``llama-vocab.cpp``) and of the models' own Hugging Face ``tokenizer.json``:

  - ``smollm``: ``Digits(individual_digits=True)`` then ``ByteLevel(use_regex=True)`` (the GPT-2
    regex), as SmolLM2's ``tokenizer.json``; llama.cpp splits ``\\p{N}`` and then applies the GPT-2
    regex, which is the same;
  - ``qwen2``: ``Split(QWEN2_REGEX, "isolated")`` then ``ByteLevel(use_regex=False)``, as transformers'
    GGUF converter and llama.cpp (no NFC normalizer: neither applies one to a GGUF);

* decoder: ``ByteLevel``;
* tokens typed CONTROL (3) become special added tokens and USER_DEFINED (4) plain added tokens, both
  matched whole in the input text (e.g. ``<|im_start|>``), as transformers' ``add_gguf_special_tokens``.

Chat templates (``tokenizer.chat_template``) are rendered by :mod:`apr_numba.model.chat_template`, like
transformers' ``apply_chat_template`` (sandboxed jinja2, the special token strings as variables).
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from apr_numba.errors import ArgumentError, ModelFormatError
from apr_numba.model.chat_template import compile_chat_template, render_chat_template
from apr_numba.model.hparams import meta_value

# llama.cpp token types (gguf-py ``TokenType``).
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

# transformers integrations/gguf _LLAMA3_SPLIT == llama.cpp LLAMA_VOCAB_PRE_TYPE_LLAMA3 (tokenizer.ggml.pre llama-bpe).
LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# transformers models/qwen2/tokenization_qwen2.py PRETOKENIZE_REGEX == llama.cpp LLAMA_VOCAB_PRE_TYPE_QWEN2.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

SUPPORTED_TOKENIZER_MODELS = ("gpt2", "llama")  # llama = SentencePiece, built by apr_numba.model.spm
SUPPORTED_PRE_TYPES = ("smollm", "qwen2", "llama-bpe", "default")

# Tokens that end a chat turn (llama.cpp's end-of-generation list, llama_vocab::impl::load), added to
# ``eos_ids`` when the vocabulary has them as CONTROL tokens.
_EOG_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
               "<|end_of_text|>", "<EOT>")

# Tokenizer metadata that to_json() keeps (everything from_metadata reads).
_CACHE_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.eom_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.chat_template",
)
_CACHE_FORMAT = "apr-numba-tokenizer/1"

_BYTE_ALPHABET = frozenset(pre_tokenizers.ByteLevel.alphabet())


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


_BYTE_TO_CHAR = _bytes_to_unicode()
# str.translate table: alphabet char -> the byte it stands for (as a latin-1 char); any other char
# below U+0100 -> a char latin-1 cannot encode, so that token falls back to its raw UTF-8 bytes.
_CHAR_TO_BYTE_TABLE: dict[int, str] = {i: "\U00010000" for i in range(256)}
_CHAR_TO_BYTE_TABLE.update({ord(c): chr(b) for b, c in _BYTE_TO_CHAR.items()})


def _token_bytes(token: str) -> bytes:
    """Bytes a byte-level token decodes to, exactly as ``tokenizers``' ByteLevel decoder does.

    A token made only of alphabet characters maps each character back to its byte; a token with any
    other character (an added token spelled outside the alphabet) contributes its UTF-8 encoding.
    """
    try:
        return token.translate(_CHAR_TO_BYTE_TABLE).encode("latin-1")
    except UnicodeEncodeError:
        return token.encode("utf-8")


def _pre_tokenizer(pre_type: str) -> Any:
    if pre_type == "smollm":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre_type in ("qwen2", "llama-bpe"):
        split = QWEN2_SPLIT_REGEX if pre_type == "qwen2" else LLAMA3_SPLIT_REGEX
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre_type == "default":  # transformers' GPT2Tokenizer split (llama.cpp's own default regexes differ)
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raise AssertionError(pre_type)  # checked by the caller


def check_text(text: Any, what: str = "prompt") -> str:
    """Check that ``text`` is a ``str`` that is valid Unicode text (encodable as UTF-8).

    A command-line argument with bytes that are not UTF-8 (``-p $'\\xff\\xfe'``) reaches Python as lone
    surrogates (PEP 383 ``surrogateescape``); so does a lone surrogate passed through the API. Neither
    can be tokenized.

    Raises:
        ArgumentError: not a str, or it holds a lone surrogate (the message gives its position).
    """
    if not isinstance(text, str):
        raise ArgumentError(f"{what} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ArgumentError(f"{what} is not valid UTF-8 text (invalid byte or lone surrogate at character "
                            f"{exc.start})") from None
    return text


class StreamDecoder:
    """Incremental detokenizer: ``push(token_id)`` returns only the newly completed text.

    Bytes of a UTF-8 character split across several tokens (an emoji is often 2-4 byte tokens) are
    held back until the character is complete, so no U+FFFD is emitted for an incomplete tail. The
    concatenation of every ``push`` result and a final ``flush()`` equals ``Tokenizer.decode`` of
    the same ids (with the same ``skip_special``).
    """

    def __init__(self, token_bytes: Sequence[bytes], special_ids: frozenset[int], skip_special: bool):
        self._token_bytes = token_bytes
        self._special_ids = special_ids
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Feed one token id; return the text completed by it ("" while a character is pending).

        Raises:
            ArgumentError: ``token_id`` is outside ``[0, vocab_size)``.
        """
        tid = int(token_id)
        if not 0 <= tid < len(self._token_bytes):
            raise ArgumentError(f"token id {tid} out of range [0, {len(self._token_bytes)})")
        if self._skip_special and tid in self._special_ids:
            return ""
        return self._utf8.decode(self._token_bytes[tid])

    def flush(self) -> str:
        """End of stream: return what is still pending (U+FFFD for an incomplete UTF-8 tail) and reset."""
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out

    @property
    def pending(self) -> bool:
        """True while bytes of an incomplete character are held back."""
        return bool(self._utf8.getstate()[0])


class Tokenizer:
    """GGUF byte-level BPE tokenizer (encode / decode / streaming decode / chat template).

    Attributes:
        vocab_size: number of token ids (``len(tokenizer.ggml.tokens)``).
        bos_id: BOS token id or None; ``eos_id``: EOS token id or None; ``pad_id``: padding id or None.
        eos_ids: frozenset of ids that end generation: ``eos_id`` plus the chat end tokens the
            vocabulary has as CONTROL tokens (``<|im_end|>``, ``<|endoftext|>``, ``<|eot_id|>``...) and
            ``tokenizer.ggml.eot_token_id`` / ``eom_token_id`` when present.
        special_ids: frozenset of CONTROL token ids (skipped by ``decode(skip_special=True)``).
        add_bos: ``tokenizer.ggml.add_bos_token`` (default False): whether ``encode`` prepends BOS.
        add_eos: ``tokenizer.ggml.add_eos_token`` (SentencePiece files; default False): whether ``encode``
            appends EOS.
        chat_template: the jinja2 chat template string, or None.
        pre_type: ``tokenizer.ggml.pre`` ("smollm", "qwen2").
        source: name of the file the tokenizer came from (used in error messages).
    """

    def __init__(
        self,
        hf: _HFTokenizer,
        tokens: list[str],
        meta: dict[str, Any],
        source: str,
        *,
        pre_type: str,
        bos_id: int | None,
        eos_id: int | None,
        pad_id: int | None,
        unk_id: int | None,
        eos_ids: frozenset[int],
        special_ids: frozenset[int],
        add_bos: bool,
        chat_template: str | None,
        add_eos: bool = False,
        piece_bytes: Callable[[str], bytes] | None = None,
    ):
        """Internal: use :meth:`from_metadata` or :meth:`from_json`. ``add_eos``: ``encode`` appends EOS;
        ``piece_bytes``: vocabulary spelling -> decoded bytes (default: the byte-level alphabet)."""
        self._hf = hf
        self._tokens = tokens
        self._meta = meta
        self.source = source
        self.vocab_size = len(tokens)
        self.pre_type = pre_type
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.unk_id = unk_id
        self.eos_ids = eos_ids
        self.special_ids = special_ids
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.add_eos = add_eos
        self._piece_bytes = piece_bytes or _token_bytes
        self._token_bytes: list[bytes] | None = None
        self._template: Any = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], source: str = "model") -> Tokenizer:
        """Build the tokenizer from GGUF metadata (GGUF key -> Python value, see ``gguf_metadata``).

        Args:
            meta: metadata mapping; only the ``tokenizer.*`` keys are read.
            source: file name used in error messages.

        Raises:
            ModelFormatError: tokenizer metadata missing or invalid (no ``tokenizer.ggml.tokens``, no
                merges, ``tokenizer.ggml.model`` other than ``gpt2``, unknown ``tokenizer.ggml.pre``,
                token types of the wrong length, a special token id out of range, merges that do not
                fit the vocabulary); the message names ``source``.
        """
        tok_model = meta_value(meta, "tokenizer.ggml.model", "str", source)
        if tok_model not in SUPPORTED_TOKENIZER_MODELS:
            raise ModelFormatError(
                f"{source}: unsupported tokenizer.ggml.model {tok_model!r} "
                f"(supported: {', '.join(SUPPORTED_TOKENIZER_MODELS)})"
            )
        if tok_model == "llama":
            from apr_numba.model.spm import spm_tokenizer_parts

            hf, spm_tokens, keep, kwargs = spm_tokenizer_parts(meta, source, _EOG_TOKENS)
            return cls(hf, spm_tokens, keep, source, **kwargs)
        tokens = meta_value(meta, "tokenizer.ggml.tokens", "str_list", source)
        if not tokens:
            raise ModelFormatError(f"{source}: tokenizer metadata 'tokenizer.ggml.tokens' is missing or empty")
        tokens = list(tokens)
        n_vocab = len(tokens)
        merges = meta_value(meta, "tokenizer.ggml.merges", "str_list", source)
        if not merges:
            raise ModelFormatError(
                f"{source}: tokenizer metadata 'tokenizer.ggml.merges' is missing or empty "
                f"(required for tokenizer.ggml.model {tok_model!r})"
            )
        pre_type = meta_value(meta, "tokenizer.ggml.pre", "str", source, None)
        if pre_type not in SUPPORTED_PRE_TYPES:
            what = "is missing" if pre_type is None else f"{pre_type!r} is not supported"
            raise ModelFormatError(
                f"{source}: pre-tokenizer tokenizer.ggml.pre {what} "
                f"(supported: {', '.join(SUPPORTED_PRE_TYPES)})"
            )
        token_type = meta_value(meta, "tokenizer.ggml.token_type", "int_list", source, None)
        if token_type is None:
            token_type = [TOKEN_NORMAL] * n_vocab
        elif len(token_type) != n_vocab:
            raise ModelFormatError(
                f"{source}: tokenizer.ggml.token_type has {len(token_type)} entries for {n_vocab} tokens"
            )

        def token_id(key: str) -> int | None:
            tid = meta_value(meta, f"tokenizer.ggml.{key}", "int", source, None)
            if tid is None:
                return None
            if not 0 <= tid < n_vocab:
                raise ModelFormatError(f"{source}: tokenizer.ggml.{key} = {tid} out of range [0, {n_vocab})")
            return tid

        bos_id = token_id("bos_token_id")
        eos_id = token_id("eos_token_id")
        pad_id = token_id("padding_token_id")
        unk_id = token_id("unknown_token_id")
        eot_id = token_id("eot_token_id")
        eom_id = token_id("eom_token_id")
        add_bos = meta_value(meta, "tokenizer.ggml.add_bos_token", "bool", source, False)
        if add_bos and bos_id is None:
            raise ModelFormatError(f"{source}: tokenizer.ggml.add_bos_token is set but there is no bos_token_id")
        chat_template = meta_value(meta, "tokenizer.chat_template", "str", source, None)

        # Byte-level vocabularies spell every token in the 256-character ByteLevel alphabet. A token
        # spelled otherwise is respelled from its UTF-8 bytes, as transformers does (fast path: one
        # set over all characters).
        bpe_tokens = tokens
        try:
            all_chars = set("".join(tokens))
        except TypeError as exc:
            raise ModelFormatError(f"{source}: tokenizer.ggml.tokens holds non-string entries") from exc
        if not all_chars <= _BYTE_ALPHABET:
            bpe_tokens = [
                t if set(t) <= _BYTE_ALPHABET else "".join(_BYTE_TO_CHAR[b] for b in t.encode("utf-8"))
                for t in tokens
            ]
        vocab = dict(zip(bpe_tokens, range(n_vocab), strict=True))
        try:
            merge_pairs = [tuple(m.split(" ")) for m in merges]
            bpe = models.BPE(vocab, merge_pairs, fuse_unk=False)
        except Exception as exc:  # tokenizers raises plain Exception / TypeError on bad merges
            raise ModelFormatError(f"{source}: invalid tokenizer.ggml.merges: {exc}") from exc
        hf = _HFTokenizer(bpe)
        hf.pre_tokenizer = _pre_tokenizer(pre_type)
        hf.decoder = decoders.ByteLevel()

        # CONTROL tokens -> special added tokens; USER_DEFINED -> plain added tokens; both matched whole.
        # A CONTROL token spelled outside the byte alphabet is a conversion mislabel: skipped (transformers).
        control = [i for i, t in enumerate(token_type) if t == TOKEN_CONTROL]
        user = [i for i, t in enumerate(token_type) if t == TOKEN_USER_DEFINED and tokens[i] in vocab]
        specials = [i for i in control if set(tokens[i]) <= _BYTE_ALPHABET]
        if specials:
            hf.add_special_tokens([AddedToken(tokens[i], normalized=False, special=True) for i in specials])
        if user:
            hf.add_tokens([AddedToken(tokens[i], normalized=False, special=False) for i in user])

        eos_set = {i for i in (eos_id, eot_id, eom_id) if i is not None}
        control_set = set(control)
        for name in _EOG_TOKENS:
            i = vocab.get(name)
            if i is not None and i in control_set:
                eos_set.add(i)

        keep = {k: meta[k] for k in _CACHE_KEYS if k in meta}
        return cls(
            hf,
            bpe_tokens,
            keep,
            source,
            pre_type=pre_type,
            bos_id=bos_id,
            eos_id=eos_id,
            pad_id=pad_id,
            unk_id=unk_id,
            eos_ids=frozenset(eos_set),
            special_ids=frozenset(specials),
            add_bos=add_bos,
            chat_template=chat_template,
        )

    def to_json(self) -> str:
        """Serialize for a start-up cache: the tokenizer metadata (tokens, merges, types, special ids,
        add_bos, chat template, pre type) plus the source name. Rebuild with :meth:`from_json`, which
        is as fast as :meth:`from_metadata` and avoids re-reading the GGUF file."""
        return json.dumps(
            {"format": _CACHE_FORMAT, "source": self.source, "meta": self._meta},
            ensure_ascii=False,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, s: str) -> Tokenizer:
        """Rebuild a tokenizer serialized by :meth:`to_json`.

        Raises:
            ModelFormatError: ``s`` is not valid JSON or not an apr-numba tokenizer cache (or the
                metadata it holds is invalid, see :meth:`from_metadata`).
        """
        try:
            obj = json.loads(s)
        except (TypeError, ValueError) as exc:
            raise ModelFormatError(f"tokenizer cache: not valid JSON ({exc})") from exc
        if (
            not isinstance(obj, dict)
            or obj.get("format") != _CACHE_FORMAT
            or not isinstance(obj.get("meta"), dict)
        ):
            raise ModelFormatError(f"tokenizer cache: not an {_CACHE_FORMAT!r} document")
        return cls.from_metadata(obj["meta"], str(obj.get("source", "tokenizer cache")))

    def check_rows(self, n_rows: int, source: str | None = None) -> None:
        """Check the vocabulary against the ``token_embd`` row count ``n_rows`` (llama.cpp requires
        ``token_embd`` to be (n_embd, n_tokens)), so that no id the tokenizer or the sampler can produce
        (bos/eos/pad included) falls outside the embedding or the logits.

        Raises:
            ModelFormatError: the counts differ; the message names the file and both counts.
        """
        where = source or self.source
        if self.vocab_size != n_rows:
            raise ModelFormatError(f"{where}: tokenizer.ggml.tokens has {self.vocab_size} tokens but token_embd "
                                   f"has {n_rows} rows (they must match)")

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``. Special tokens written in the text (``<|im_start|>``...) are matched whole.

        Args:
            text: input string.
            add_bos: prepend BOS; None uses the model's ``tokenizer.ggml.add_bos_token``.

        Raises:
            ArgumentError: ``text`` is not a str, or BOS is requested but the model has none.
        """
        check_text(text, "encode() input")
        ids = self._hf.encode(text, add_special_tokens=False).ids
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise ArgumentError(f"{self.source}: add_bos requested but the model has no BOS token")
            ids.insert(0, self.bos_id)
        if self.add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        out = [int(i) for i in ids]
        if out and (min(out) < 0 or max(out) >= self.vocab_size):
            bad = next(i for i in out if not 0 <= i < self.vocab_size)
            raise ArgumentError(f"token id {bad} out of range [0, {self.vocab_size})")
        return out

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of ``ids`` (invalid UTF-8 becomes U+FFFD, as in transformers).

        Args:
            ids: token ids (any ints, numpy included).
            skip_special: drop CONTROL tokens (``<|im_end|>``...) from the text.

        Raises:
            ArgumentError: an id is outside ``[0, vocab_size)``.
        """
        return self._hf.decode(self._check_ids(ids), skip_special_tokens=skip_special)

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        """A :class:`StreamDecoder` for incremental detokenization of generated ids."""
        return StreamDecoder(self.token_bytes(), self.special_ids, skip_special)

    def token_bytes(self) -> list[bytes]:
        """Per-id bytes each token decodes to (built on first use, ~0.1 s for 152k tokens)."""
        if self._token_bytes is None:
            self._token_bytes = [self._piece_bytes(t) for t in self._tokens]
        return self._token_bytes

    def token_to_id(self, token: str) -> int | None:
        """Id of a token spelled as in the vocabulary (byte-level spelling), or None."""
        return self._hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        """Vocabulary spelling of ``token_id``.

        Raises:
            ArgumentError: ``token_id`` is outside ``[0, vocab_size)``.
        """
        return self._tokens[self._check_ids([token_id])[0]]

    # ------------------------------------------------------------------ chat template

    def _special_token_vars(self) -> dict[str, str]:
        out = {}
        for name, tid in (
            ("bos_token", self.bos_id),
            ("eos_token", self.eos_id),
            ("unk_token", self.unk_id),
            ("pad_token", self.pad_id),
        ):
            if tid is not None:
                out[name] = self._tokens[tid]
        return out

    def _compiled_template(self) -> Any:
        if self._template is None:
            if self.chat_template is None:
                raise ArgumentError(f"{self.source}: the model has no chat template (tokenizer.chat_template)")
            self._template = compile_chat_template(self.chat_template, self.source)
        return self._template

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` (``[{"role": ..., "content": ...}, ...]``) with the model's chat template.

        The template sees ``messages``, ``add_generation_prompt``, ``tools``/``documents`` (None unless
        given in ``kwargs``), ``bos_token``/``eos_token``/``unk_token``/``pad_token`` and the globals
        ``raise_exception`` and ``strftime_now``, as with transformers' ``apply_chat_template``.

        Raises:
            ArgumentError: the model has no chat template, ``messages`` is not a list of dicts, or the
                template rejected the conversation (``raise_exception``).
            ModelFormatError: the template does not compile.
        """
        template = self._compiled_template()
        variables = {**self._special_token_vars(), **kwargs}
        return render_chat_template(template, messages, add_generation_prompt, variables, self.source)

    StreamDecoder = StreamDecoder

    def __repr__(self) -> str:
        return (
            f"Tokenizer(source={self.source!r}, pre_type={self.pre_type!r}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_ids={sorted(self.eos_ids)})"
        )

