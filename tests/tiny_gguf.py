"""A tiny but complete one-layer decoder GGUF for tests of loading and bad input (shared by test files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

T = GGMLQuantizationType
# Byte offsets of the float16 fields (block scales) of each GGML block type. Every other byte of a block is
# valid for any value, so random bytes with finite, bounded values here are random valid blocks.
F16_FIELDS = {T.Q8_0: [0], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q4_K: [0, 2],
              T.Q6_K: [208], T.Q2_K: [80, 82], T.Q3_K: [108], T.Q5_K: [0, 2], T.IQ4_NL: [0], T.IQ4_XS: [0]}


def random_blocks(qtype: GGMLQuantizationType, rows: int, cols: int, rng: np.random.Generator,
                  d_std: float = 0.02) -> np.ndarray:
    """(rows, row_bytes) uint8 of random valid blocks of ``qtype``: random bytes, float16 scales ~ N(0, d_std)."""
    bs, ts = GGML_QUANT_SIZES[qtype]
    nb = rows * cols // bs
    blocks = rng.integers(0, 256, (nb, ts), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        d = (rng.standard_normal(nb) * d_std).astype("<f2")
        blocks[:, off:off + 2] = d.view(np.uint8).reshape(nb, 2)
    return blocks.reshape(rows, -1)


def byte_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode alphabet (256 characters), the spelling of byte-level BPE tokens."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def add_byte_bpe_vocab(w: GGUFWriter, n_vocab: int, pre: str) -> None:
    """A valid byte-level BPE vocabulary of ``n_vocab`` tokens: the 256 byte symbols, "to" (one merge) and
    padding tokens; BOS 0, EOS 1; pre-tokenizer ``pre``."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    toks = byte_alphabet() + ["to"]
    w.add_token_list(toks + [f"<extra_{i}>" for i in range(n_vocab - len(toks))])
    w.add_token_merges(["t o"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)


# float16 scale spread per type that gives weights of typical magnitude ~0.05 (block scale x code x sub-scale)
MODEL_D_STD = {T.Q8_0: 5e-4, T.Q4_0: 0.01, T.Q4_1: 0.01, T.Q5_0: 5e-3, T.Q5_1: 5e-3, T.Q4_K: 3e-4, T.Q6_K: 2e-4,
               T.Q2_K: 5e-3, T.Q3_K: 1.5e-3, T.Q5_K: 1e-4, T.IQ4_NL: 1e-3, T.IQ4_XS: 5e-5}


def write_tiny_gguf(path: Path, arch: str = "llama", q_type: GGMLQuantizationType | None = None,
                    extra: dict[str, tuple[int, ...]] | None = None, scale: float = 1.0,
                    quant: dict[str, GGMLQuantizationType] | None = None,
                    dims: tuple[int, int, int, int] = (64, 2, 128, 300)) -> dict[str, np.ndarray]:
    """Write a one-layer decoder GGUF with a valid tokenizer; F32 tensors, except ``blk.0.attn_q.weight``
    stored as ``q_type`` (random bytes, scales included) when given, and the tensors named in ``quant`` stored
    as random valid blocks of their type (:func:`random_blocks`, scales ``MODEL_D_STD``). ``extra``: more F32
    tensors (name -> shape), e.g. a toy variant's post-norms; ``scale`` multiplies the random matrices (norm
    weights stay ~N(1, 0.1)). ``dims`` is (n_embd, n_head, n_ff, n_vocab).
    Returns the tensors written (raw bytes for quantized ones)."""
    D, H, F, V = dims
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(H)
    w.add_layer_norm_rms_eps(1e-5)
    add_byte_bpe_vocab(w, V, "smollm")
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (V, D), "output_norm.weight": (D,), "blk.0.attn_norm.weight": (D,),
              "blk.0.ffn_norm.weight": (D,), "blk.0.attn_q.weight": (D, D), "blk.0.attn_k.weight": (D, D),
              "blk.0.attn_v.weight": (D, D), "blk.0.attn_output.weight": (D, D),
              "blk.0.ffn_gate.weight": (F, D), "blk.0.ffn_up.weight": (F, D), "blk.0.ffn_down.weight": (D, F)}
    shapes.update(extra or {})
    arrays = {}
    for name, shape in shapes.items():
        if q_type is not None and name == "blk.0.attn_q.weight":
            bs, ts = GGML_QUANT_SIZES[q_type]
            arrays[name] = rng.integers(0, 256, (shape[0], shape[1] // bs * ts), dtype=np.uint8)
            w.add_tensor(name, arrays[name], raw_dtype=q_type)
        elif quant and name in quant:
            qt = quant[name]
            rows, cols = shape if len(shape) == 2 else (1, shape[0])
            arrays[name] = random_blocks(qt, rows, cols, rng, MODEL_D_STD[qt]).reshape(*shape[:-1], -1)
            w.add_tensor(name, arrays[name], raw_dtype=qt)
        elif len(shape) == 1:
            arrays[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32) if scale != 1.0 else \
                rng.standard_normal(shape).astype(np.float32)
            w.add_tensor(name, arrays[name])
        else:
            arrays[name] = (scale * rng.standard_normal(shape)).astype(np.float32)
            w.add_tensor(name, arrays[name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return arrays
