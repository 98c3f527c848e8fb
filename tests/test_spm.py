"""SentencePiece (``tokenizer.ggml.model = llama``) and llama-bpe tokenizers built from GGUF metadata.

References:

* the committed tiny checkpoints (tests/fixtures/arch/*.gguf): ``<name>_ref.npz`` holds the ids that the HF
  tokenizer saved beside each checkpoint gives for its 5 prompts (``prompt_ids_i``, with HF's default
  ``add_special_tokens=True``, i.e. BOS where the tokenizer adds one); make_arch_fixtures.py. These cover
  SentencePiece llama (prefix space, BOS 1), SentencePiece gemma3 (no prefix space, BOS 2), Llama-3's
  ``llama-bpe`` split and qwen2's;
* a hand-made SentencePiece vocabulary whose expected ids follow by hand from llama.cpp's rule
  (``llm_tokenizer_spm``: repeatedly merge the adjacent pair that makes the highest-scoring piece, then
  byte fallback for characters that are no piece).

gemma-3-270m's 262,144-piece vocabulary is tested against HF on the shared edge cases in test_tokenizer.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from apr_numba.errors import ModelFormatError
from apr_numba.model.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")

ARCH = Path(__file__).resolve().parent / "fixtures" / "arch"
NAMES = sorted(p.name[: -len("_ref.json")] for p in ARCH.glob("*_ref.json"))


def _fixture_meta(name: str) -> dict:
    from apr_numba.model.hparams import gguf_metadata

    ref = json.loads((ARCH / f"{name}_ref.json").read_text(encoding="utf-8"))
    return ref, gguf_metadata(gguf.GGUFReader(str(ARCH / ref["gguf_file"])))


@pytest.mark.parametrize("name", NAMES)
def test_fixture_prompt_ids_match_hf(name):
    ref, meta = _fixture_meta(name)
    npz = np.load(ARCH / f"{name}_ref.npz")
    tok = Tokenizer.from_metadata(meta, source=ref["gguf_file"])
    back = Tokenizer.from_json(tok.to_json())  # the start-up cache must give the same tokenizer
    for i, prompt in enumerate(ref["prompts"]):
        expected = [int(x) for x in npz[f"prompt_ids_{i}"]]
        assert tok.encode(prompt) == expected, (name, i)
        assert back.encode(prompt) == expected, (name, i)
        assert tok.decode(expected, skip_special=True) == prompt
        assert "".join(tok.stream_decoder(skip_special=True).push(t) for t in expected).lstrip() == prompt.lstrip()
    for attr in ("vocab_size", "bos_id", "eos_id", "pad_id", "unk_id", "eos_ids", "special_ids", "add_bos", "pre_type"):
        assert getattr(back, attr) == getattr(tok, attr), attr


# ---------------------------------------------------------------------------------------- hand-made vocabulary

BYTES = [f"<0x{b:02X}>" for b in range(256)]
PIECES = {"▁": -10.0, "a": -11.0, "b": -12.0, "c": -13.0, "bc": -1.0, "abc": -2.0, "▁a": -3.0, "ab": -4.0,
          "▁ab": -5.0, "▁▁": -6.0}


def _spm_meta(**over) -> dict:
    tokens = ["<unk>", "<s>", "</s>", *BYTES, *PIECES]
    meta = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0, 0.0, 0.0] + [0.0] * 256 + list(PIECES.values()),
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(PIECES),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    meta.update(over)
    return {k: v for k, v in meta.items() if v is not None}


def _ids(tok: Tokenizer, *pieces: str) -> list[int]:
    return [tok.token_to_id(p) for p in pieces]


def test_merges_follow_scores_and_prefix_space():
    tok = Tokenizer.from_metadata(_spm_meta(), source="tiny-spm.gguf")
    # "▁abc": bc (-1) first, then a+bc = abc (-2) beats ▁+a (-3); "▁abc" is no piece
    assert tok.encode("abc", add_bos=False) == _ids(tok, "▁", "abc")
    # "▁ab": ▁a (-3) then ▁a+b = ▁ab (-5)
    assert tok.encode("ab", add_bos=False) == _ids(tok, "▁ab")
    assert tok.encode("ab") == [1, *_ids(tok, "▁ab")]  # add_bos_token absent: llama.cpp adds BOS for SPM
    # the decoder strips the one leading space of the whole text (after a shown BOS there is none to strip)
    assert tok.decode(tok.encode("abc"), skip_special=True) == "abc" and tok.decode(tok.encode("abc")) == "<s> abc"
    # an existing leading space is not doubled (Metaspace), a run of two is the piece ▁▁
    assert tok.encode(" ab", add_bos=False) == _ids(tok, "▁ab")
    assert tok.encode("  ab", add_bos=False) == _ids(tok, "▁", "▁ab")


def test_byte_fallback_and_decode():
    tok = Tokenizer.from_metadata(_spm_meta(), source="tiny-spm.gguf")
    ids = tok.encode("aé", add_bos=False)  # é = C3 A9 is no piece
    assert ids == [*_ids(tok, "▁a"), 3 + 0xC3, 3 + 0xA9]
    assert tok.decode(ids) == "aé"
    assert tok.token_bytes()[3 + 0x0A] == b"\n" and tok.token_bytes()[tok.token_to_id("▁a")] == b" a"
    dec = tok.stream_decoder()
    assert [dec.push(i) for i in ids] == [" a", "", "é"]  # the stream keeps the prefix space
    assert tok.decode(tok.encode("x\ny", add_bos=False)) == "x\ny"  # x, y and \n all by bytes


def test_special_tokens_whole_and_add_eos():
    tok = Tokenizer.from_metadata(_spm_meta(**{"tokenizer.ggml.add_eos_token": True}), source="t.gguf")
    # transformers' Metaspace(prepend_scheme="first") prefixes only the start of the text
    assert tok.encode("<s>a</s>", add_bos=False) == [1, *_ids(tok, "a"), 2, 2]
    assert tok.special_ids == {0, 1, 2} and tok.eos_ids == {2}
    back = Tokenizer.from_json(tok.to_json())
    assert back.encode("abc") == tok.encode("abc") == [1, *_ids(tok, "▁", "abc"), 2]


def test_no_space_prefix():
    tok = Tokenizer.from_metadata(_spm_meta(**{"tokenizer.ggml.add_space_prefix": False}), source="t.gguf")
    assert tok.encode("abc", add_bos=False) == _ids(tok, "abc")
    assert tok.encode(" abc", add_bos=False) == _ids(tok, "▁", "abc")
    assert tok.decode(tok.encode(" abc", add_bos=False)) == " abc"  # no space stripped either


def test_gemma_respells_whitespace_pieces():
    meta = _spm_meta(**{"general.architecture": "gemma3", "tokenizer.ggml.add_space_prefix": False})
    tokens = list(meta["tokenizer.ggml.tokens"])
    tokens[tokens.index("▁▁")] = "  "  # gemma files store whitespace-only pieces with real spaces
    tok = Tokenizer.from_metadata({**meta, "tokenizer.ggml.tokens": tokens}, source="g.gguf")
    assert tok.encode("a  bc", add_bos=False) == _ids(tok, "a", "▁▁", "bc")
    assert tok.decode(tok.encode("a  bc", add_bos=False)) == "a  bc"


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"tokenizer.ggml.tokens": []}, "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.tokens": [b"a"] * 269, "tokenizer.ggml.token_type": None}, "non-string items"),
        ({"tokenizer.ggml.scores": [0.0, 1.0]}, "scores has 2 entries"),
        ({"tokenizer.ggml.scores": ["x"] * 269}, "scores holds non-numbers"),
        ({"tokenizer.ggml.add_space_prefix": "maybe"}, "add_space_prefix' must be a boolean"),
        ({"tokenizer.ggml.token_type": [1]}, "token_type has 1 entries"),
        ({"tokenizer.ggml.scores": None}, "neither tokenizer.ggml.scores nor merges"),
        ({"tokenizer.ggml.bos_token_id": 10**6}, "bos_token_id = 1000000 out of range"),
        ({"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.bos_token_id": None}, "no bos_token_id"),
        ({"tokenizer.ggml.add_eos_token": True, "tokenizer.ggml.eos_token_id": None}, "no eos_token_id"),
        ({"tokenizer.ggml.merges": ["x y"]}, "invalid SentencePiece merges"),
        ({"tokenizer.chat_template": 5}, "chat_template"),
    ],
)
def test_bad_spm_metadata(over, match):
    with pytest.raises(ModelFormatError, match=match) as info:
        Tokenizer.from_metadata(_spm_meta(**over), source="bad-spm.gguf")
    assert "bad-spm.gguf" in str(info.value)
