"""Every architecture ArchSpec describes runs on the Numba CPU forward and agrees with the float64 reference
(gemma3 with sliding windows, qwen3, qwen3moe, llama with rope_freqs); the MoE kernel reads only the experts
it chose. Tiny random F32 files from tests/tiny_arch.py; HF parity of these architectures is checked on the
committed fixtures of tests/fixtures/make_arch_fixtures.py."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from numba import typed

from apr_numba.backends.cpu_forward import _moe_ffn, cfg_tuple
from apr_numba.backends.reference import ReferenceModel
from apr_numba.backends.reference_ops import moe_ffn, silu
from apr_numba.kernels.matmul import packed_tuple
from apr_numba.model.decoder import load
from apr_numba.quants.layouts import decode_codes
from apr_numba.quants.repack import pack
from tests.tiny_arch import write_arch_gguf

IDS = [3, 77, 120, 5, 9, 250, 41, 66, 8, 12, 199, 30]  # 12 positions: longer than the gemma3 window below


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("arch, window, features", [
    ("gemma3", 4, {"qk_norm", "post_attn_norm", "post_ffn_norm", "gelu_tanh", "embed_scale", "sliding_window"}),
    ("qwen3", 0, {"qk_norm"}),
    ("qwen3moe", 0, {"qk_norm", "moe"}),
    ("llama", 0, {"rope_freqs"}),
])
def test_cpu_forward_agrees_with_reference(tmp_path, arch, window, features):
    p = tmp_path / f"{arch}.gguf"
    write_arch_gguf(p, arch, window=window)
    m = load(p, backend="cpu", warmup=False)
    assert m.spec.features == frozenset(features)
    assert m.config.head_dim == 32 != m.config.n_embd // m.config.n_head
    ref = ReferenceModel(p)
    want = ref.forward(IDS).logits
    got = m.logits(IDS)
    assert min(cosine(got[t], want[t]) for t in range(len(IDS))) > 0.99999
    # decode through the KV cache equals the prefill logits, on both backends
    m.reset()
    m.eval(IDS[:-3], n_logits=0)
    steps = np.stack([m.eval([t])[0] for t in IDS[-3:]])
    assert min(cosine(steps[i], want[len(IDS) - 3 + i]) for i in range(3)) > 0.99999
    st = ref.new_state(32)
    ref.eval(IDS[:-1], st, n_logits=0)
    np.testing.assert_allclose(ref.eval(IDS[-1:], st)[0], want[-1], rtol=0, atol=1e-9)


def test_sliding_window_changes_gemma3(tmp_path):
    """The window matters: the same weights with full attention give other logits past the window."""
    a, b = tmp_path / "swa.gguf", tmp_path / "full.gguf"
    write_arch_gguf(a, "gemma3", window=4)
    write_arch_gguf(b, "gemma3", window=0)
    la, lb = load(a, backend="cpu", warmup=False).logits(IDS), load(b, backend="cpu", warmup=False).logits(IDS)
    np.testing.assert_allclose(la[:4], lb[:4], rtol=1e-5, atol=1e-5)  # within the window: identical
    assert cosine(la[-1], lb[-1]) < 0.9999


def _f32_packed(w: np.ndarray):
    return packed_tuple(pack(decode_codes(int(GT.F32), w.astype(np.float32).view(np.uint8), w.shape)))


def test_moe_kernel_reads_only_the_chosen_experts():
    rng = np.random.default_rng(1)
    T, D, E, K, Fe = 5, 32, 4, 2, 16
    h = np.abs(rng.standard_normal((T, D))).astype(np.float32) + 0.1  # positive rows
    router = np.abs(rng.standard_normal((E, D))).astype(np.float32)
    router[2] = -1.0  # expert 2's logit is negative for every positive row: never in the top 2
    gate, up, down = (0.2 * rng.standard_normal(s).astype(np.float32) for s in ((E, Fe, D), (E, Fe, D), (E, D, Fe)))
    gate[2] = up[2] = down[2] = np.nan  # any read of expert 2 would turn the output into NaN
    experts = typed.List()
    for e in range(E):
        for w in (gate[e], up[e], down[e]):
            experts.append(_f32_packed(w))

    class Spec:  # the fields cfg_tuple reads
        from apr_numba.model.hparams import ModelConfig

        hp = ModelConfig("qwen3moe", 1, D, 2, 1, 8, 10, 16, 1e6, 2, 1e-6, head_dim=16)
        rope_type, qkv_bias, qk_norm, post_attn_norm, post_ffn_norm, activation = 2, False, True, False, False, 0
        n_expert, n_expert_used, expert_norm, n_ff_expert = E, K, True, Fe

    out = np.empty((T, D), np.float32)
    off = np.full((32, 1), -1, np.int64)
    _moe_ffn(out, h, _f32_packed(router), experts, 0, cfg_tuple(Spec), off, np.zeros(0, np.float32))
    want = moe_ffn(h.astype(np.float64), router.astype(np.float64), np.nan_to_num(gate.astype(np.float64)),
                   np.nan_to_num(up.astype(np.float64)), np.nan_to_num(down.astype(np.float64)), K, True, silu)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
