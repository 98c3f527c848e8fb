"""Write a synthetic GGUF with Qwen2.5-7B shapes and a Q4_K_M-like type mix (issue 14 part 5; a benchmark input).

Shapes (Qwen2.5-7B-Instruct ``config.json``): 28 layers, n_embd 3584, 28 query / 4 KV heads of 128, n_ff
18944, vocab 152064, QKV biases, rope_theta 1e6. Types follow llama.cpp's Q4_K_M recipe
(``llama_tensor_get_type``): Q4_K for the matrices, Q6_K for ``attn_v`` and ``ffn_down`` of the layers
``use_more_bits`` selects (the first and last eighth and every third between: 12 of 28) and for ``output``,
Q6_K ``token_embd`` (llama.cpp uses Q4_K there; Q6_K is the heavier choice), F32 norms and biases.

Blocks are random but valid: random codes and 6-bit sub-scales, float16 super-block scales drawn from
|N(0, 1)| * scale so that every weight stays below ~0.1 and the activations of 28 layers stay finite.
The tokenizer (vocabulary, merges, types, special ids, chat template) is copied from the real
qwen2.5-coder GGUF's metadata and padded to 152064 tokens with ``[PADn]`` entries, as llama.cpp's converter
does. Tensors are streamed to the file one at a time (peak memory ~ one tensor)::

    python bench/make_synth_7b.py [-o models/synth-qwen2.5-7b-q4_k_m.gguf] [--tokenizer-from PATH] [--layers 28]

About 4.7 GB at 28 layers; the script checks the free disk space first.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

Q = GGMLQuantizationType
N_LAYER, D, N_HEAD, N_KV, HEAD_DIM, N_FF, VOCAB = 28, 3584, 28, 4, 128, 18944, 152064
# Offsets of the float16 scales in a block, and their spread: w <= d * 63 * 15 (+ dmin * 63) for Q4_K,
# d * 127 * 32 for Q6_K.
F16_SCALES = {Q.Q4_K: ((0, 1.0e-4), (2, 1.0e-4)), Q.Q6_K: ((208, 2.0e-5),), Q.Q8_0: ((0, 2.0e-4),)}


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's rule (src/llama-quant.cpp) for the layers Q4_K_M gives Q6_K attn_v / ffn_down."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def random_blocks(rng: np.random.Generator, qtype, rows: int, cols: int) -> np.ndarray:
    """uint8 (rows, row_bytes): random codes, bounded float16 scales (see F16_SCALES)."""
    bs, ts = GGML_QUANT_SIZES[qtype]
    nb = rows * cols // bs
    blocks = np.frombuffer(rng.bytes(nb * ts), np.uint8).reshape(nb, ts).copy()
    for off, scale in F16_SCALES[qtype]:
        d = (np.abs(rng.standard_normal(nb, np.float32)) * scale).astype("<f2")
        blocks[:, off:off + 2] = d.view(np.uint8).reshape(nb, 2)
    return blocks.reshape(rows, -1)


def plan(n_layer: int) -> list[tuple[str, tuple[int, ...], object]]:
    """(name, NumPy shape (out, in), type) of every tensor, in file order."""
    q_dim, kv_dim = N_HEAD * HEAD_DIM, N_KV * HEAD_DIM
    out = [("token_embd.weight", (VOCAB, D), Q.Q6_K)]
    for i in range(n_layer):
        more = Q.Q6_K if use_more_bits(i, n_layer) else Q.Q4_K
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", (D,), Q.F32),
                (p + "attn_q.weight", (q_dim, D), Q.Q4_K), (p + "attn_q.bias", (q_dim,), Q.F32),
                (p + "attn_k.weight", (kv_dim, D), Q.Q4_K), (p + "attn_k.bias", (kv_dim,), Q.F32),
                (p + "attn_v.weight", (kv_dim, D), more), (p + "attn_v.bias", (kv_dim,), Q.F32),
                (p + "attn_output.weight", (D, q_dim), Q.Q4_K),
                (p + "ffn_norm.weight", (D,), Q.F32),
                (p + "ffn_gate.weight", (N_FF, D), Q.Q4_K), (p + "ffn_up.weight", (N_FF, D), Q.Q4_K),
                (p + "ffn_down.weight", (D, N_FF), more)]
    out += [("output_norm.weight", (D,), Q.F32), ("output.weight", (VOCAB, D), Q.Q6_K)]
    return out


def nbytes(shape, qtype) -> int:
    bs, ts = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    return n // bs * ts


def copy_tokenizer(w: GGUFWriter, src: Path) -> None:
    """Copy the tokenizer.* keys of ``src`` (a qwen2 GGUF), padding the token list to VOCAB."""
    r = GGUFReader(str(src))
    f = r.fields
    tokens = [bytes(f["tokenizer.ggml.tokens"].parts[i]).decode("utf-8") for i in f["tokenizer.ggml.tokens"].data]
    types = [int(f["tokenizer.ggml.token_type"].parts[i][0]) for i in f["tokenizer.ggml.token_type"].data]
    merges = [bytes(f["tokenizer.ggml.merges"].parts[i]).decode("utf-8") for i in f["tokenizer.ggml.merges"].data]
    n_pad = VOCAB - len(tokens)
    tokens += [f"[PAD{i}]" for i in range(len(tokens), VOCAB)]
    types += [4] * n_pad  # USER_DEFINED, as convert_hf_to_gguf pads
    w.add_tokenizer_model(f["tokenizer.ggml.model"].contents())
    w.add_tokenizer_pre(f["tokenizer.ggml.pre"].contents())
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key in ("eos_token_id", "padding_token_id", "bos_token_id"):
        if f"tokenizer.ggml.{key}" in f:
            w.add_uint32(f"tokenizer.ggml.{key}", int(f[f"tokenizer.ggml.{key}"].contents()))
    if "tokenizer.ggml.add_bos_token" in f:
        w.add_key_value("tokenizer.ggml.add_bos_token", bool(f["tokenizer.ggml.add_bos_token"].contents()),
                        GGUFValueType.BOOL)
    if "tokenizer.chat_template" in f:
        w.add_chat_template(f["tokenizer.chat_template"].contents())


def write(path: Path, tokenizer_from: Path, n_layer: int = N_LAYER, seed: int = 0) -> int:
    """Write the file; returns its size in bytes.

    Raises:
        SystemExit: not enough free disk space for the file (+ 1 GiB).
    """
    tensors = plan(n_layer)
    total = sum(nbytes(s, t) for _, s, t in tensors)
    free = shutil.disk_usage(path.parent).free
    if free < total + (1 << 30):
        raise SystemExit(f"{path.parent}: {free / 1e9:.1f} GB free, need {total / 1e9:.1f} GB + 1 GiB")
    w = GGUFWriter(str(path), "qwen2")
    w.add_name("synthetic Qwen2.5-7B shapes, Q4_K_M-like mix, random weights")
    w.add_block_count(n_layer)
    w.add_context_length(32768)
    w.add_embedding_length(D)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_rope_freq_base(1.0e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(15)  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    copy_tokenizer(w, tokenizer_from)
    for name, shape, qtype in tensors:
        if qtype == Q.F32:
            w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
        else:
            bs, ts = GGML_QUANT_SIZES[qtype]
            w.add_tensor_info(name, (shape[0], shape[1] // bs * ts), np.dtype(np.uint8), nbytes(shape, qtype),
                              raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for k, (name, shape, qtype) in enumerate(tensors):
        if qtype == Q.F32:
            if name.endswith("norm.weight"):
                arr = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            else:
                arr = (0.02 * rng.standard_normal(shape)).astype(np.float32)
        else:
            arr = random_blocks(rng, qtype, *shape)
        w.write_tensor_data(arr)
        print(f"\r[{k + 1}/{len(tensors)}] {name:<28}", end="", file=sys.stderr, flush=True)
    w.close()
    print(file=sys.stderr)
    return path.stat().st_size


def main(argv=None) -> int:
    root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, default=root / "models" / "synth-qwen2.5-7b-q4_k_m.gguf")
    ap.add_argument("--tokenizer-from", type=Path, default=root / "models" / "qwen2.5-coder-0.5b-instruct.gguf")
    ap.add_argument("--layers", type=int, default=N_LAYER, help="fewer layers for a quick check")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    a.output.parent.mkdir(parents=True, exist_ok=True)
    size = write(a.output, a.tokenizer_from, a.layers, a.seed)
    print(f"{a.output}: {size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
