"""Tiny random decoders of the architectures ArchSpec describes (gemma3, qwen3, qwen3moe, llama with rope_freqs),
written with gguf-py's GGUFWriter under llama.cpp's tensor names and metadata keys, F32 throughout.

For backend-agreement tests (the Numba CPU forward against the float64 reference); the independent HF
references of these architectures are the fixtures of tests/fixtures/make_arch_fixtures.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFWriter

from tests.tiny_gguf import add_byte_bpe_vocab

D, H, HKV, HD, F, V, L = 64, 4, 2, 32, 96, 300, 3
E, K, FE = 4, 2, 48  # experts, experts per token, expert FFN width


def write_arch_gguf(path: Path, arch: str, window: int = 0, seed: int = 0, qk_gain: float = 1.0) -> None:
    """Write a 3-layer ``arch`` decoder (head_dim 32 != n_embd / n_head = 16, GQA 4/2).

    gemma3: QK-norm, post-norms, GeGLU, embedding scale, ``attention.sliding_window = window``.
    qwen3: QK-norm. qwen3moe: QK-norm and 4 experts, 2 per token. llama: a ``rope_freqs`` tensor.
    ``qk_gain``: multiplies attn_q, attn_k and the QK-norm weights (large attention scores).
    """
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), arch)
    w.add_block_count(L)
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(HKV)
    w.add_key_length(HD)
    w.add_value_length(HD)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0 if arch != "qwen3moe" else 1e6)
    if arch == "gemma3":
        w.add_sliding_window(window)
    if arch == "qwen3moe":
        w.add_expert_count(E)
        w.add_expert_used_count(K)
        w.add_expert_feed_forward_length(FE)
    add_byte_bpe_vocab(w, V, "qwen2")

    def mat(*shape, scale=0.08):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    t = {"token_embd.weight": mat(V, D, scale=0.5 if arch != "gemma3" else 0.06), "output_norm.weight": norm(D)}
    if arch == "llama":
        t["rope_freqs.weight"] = np.linspace(1.0, 8.0, HD // 2).astype(np.float32)
    for il in range(L):
        p = f"blk.{il}."
        t[p + "attn_norm.weight"] = norm(D)
        t[p + "attn_q.weight"], t[p + "attn_k.weight"] = qk_gain * mat(H * HD, D), qk_gain * mat(HKV * HD, D)
        t[p + "attn_v.weight"], t[p + "attn_output.weight"] = mat(HKV * HD, D), mat(D, H * HD)
        if arch in ("gemma3", "qwen3", "qwen3moe"):
            t[p + "attn_q_norm.weight"], t[p + "attn_k_norm.weight"] = qk_gain * norm(HD), qk_gain * norm(HD)
        if arch == "gemma3":
            t[p + "post_attention_norm.weight"], t[p + "post_ffw_norm.weight"] = norm(D), norm(D)
        t[p + "ffn_norm.weight"] = norm(D)
        if arch == "qwen3moe":
            router = mat(E, D, scale=0.5)
            gate, up, down = mat(E, FE, D), mat(E, FE, D), mat(E, D, FE)
            t[p + "ffn_gate_inp.weight"] = router
            t[p + "ffn_gate_exps.weight"], t[p + "ffn_up_exps.weight"] = gate, up
            t[p + "ffn_down_exps.weight"] = down
        else:
            t[p + "ffn_gate.weight"], t[p + "ffn_up.weight"] = mat(F, D), mat(F, D)
            t[p + "ffn_down.weight"] = mat(D, F)
    for name, arr in t.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
