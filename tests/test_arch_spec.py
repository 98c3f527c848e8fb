"""The single architecture description (apr_numba.arch.spec): built from real files, refusing what a backend
lacks, and one flag reaching every backend (issue 12).

The toy variant is a llama block with gemma-style post-norms (``post_attention_norm`` / ``post_ffw_norm``,
optional llama features in apr_numba.arch.traits): the Numba CPU forward, the float64 reference and the
OpenCL backend (PoCL) must agree on it, and each must differ from the same weights without post-norms,
so the flag demonstrably changes what all three compute.
"""

from __future__ import annotations

import numpy as np
import pytest

from apr_numba.arch.spec import ArchSpec
from apr_numba.arch.stages import DENSE_STAGES, STAGES
from apr_numba.arch.traits import ARCH_TRAITS
from apr_numba.backends.cpu_forward import IMPLEMENTS as CPU_IMPLEMENTS
from apr_numba.backends.reference import IMPLEMENTS as REF_IMPLEMENTS
from apr_numba.backends.reference import ReferenceModel
from apr_numba.errors import ModelFormatError
from apr_numba.formats.gguf_file import GGUFFile
from apr_numba.model import plan
from apr_numba.model.decoder import load
from tests.tiny_gguf import write_tiny_gguf

D = 64
POST = {"blk.0.post_attention_norm.weight": (D,), "blk.0.post_ffw_norm.weight": (D,)}


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("name, features", [("smollm2-135m", set()), ("qwen2.5-coder-0.5b", {"qkv_bias"})])
def test_spec_of_real_models_names_exactly_their_tensors(name, features):
    from apr_numba.hub.pull import resolve_model

    src = GGUFFile(resolve_model(name, progress=False))
    spec = ArchSpec.from_metadata(src.metadata, str(src.path), src.tensors,
                                  n_vocab=src.tensors["token_embd.weight"].shape[0])
    assert set(spec.features) == features
    named = {ts.name for ts in plan.all_tensors(spec)}
    assert named == set(src.tensors), named ^ set(src.tensors)  # every file tensor, nothing else
    plan.check_tensors(spec, src)
    assert spec.block_stages(0) == tuple(s for s in DENSE_STAGES if s not in ("final_norm", "lm_head"))
    assert spec.block_stages()[-2:] == ("final_norm", "lm_head")


def test_unknown_architecture_lists_the_known_ones(tmp_path):
    p = tmp_path / "m.gguf"
    write_tiny_gguf(p, arch="mamba")
    with pytest.raises(ModelFormatError) as e:
        load(p, backend="cpu", warmup=False)
    msg = str(e.value)
    assert str(p) in msg and "mamba" in msg and all(a in msg for a in ARCH_TRAITS)


def test_a_feature_a_backend_lacks_is_refused_by_name(tmp_path):
    p = tmp_path / "m.gguf"
    write_tiny_gguf(p)
    src = GGUFFile(p)
    spec = ArchSpec.from_metadata(src.metadata, str(p), src.tensors).with_features(attn_softcap=50.0)
    assert "attn_softcap" not in CPU_IMPLEMENTS  # Gemma-2's score soft-cap: the reference has it, the CPU not yet
    with pytest.raises(ModelFormatError, match=r"attn_softcap.*cpu backend"):
        spec.require("cpu", CPU_IMPLEMENTS, str(p))
    spec.require("reference", REF_IMPLEMENTS, str(p))
    moe = ArchSpec.from_metadata(src.metadata, str(p), src.tensors).with_features(n_expert=4, n_expert_used=2)
    assert moe.block_stages(0)[-3:] == ("moe_router", "moe_ffn_out", "moe_router_indices")
    assert set(moe.block_stages()) <= set(STAGES)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    with_post, plain = d / "post.gguf", d / "plain.gguf"
    write_tiny_gguf(with_post, extra=POST, scale=0.05)
    write_tiny_gguf(plain, scale=0.05)  # the same seed: identical weights, minus the post-norms
    return with_post, plain


IDS = [5, 17, 42, 99, 7, 260, 3, 11]


def test_toy_post_norm_flag_reaches_cpu_and_reference(toy):
    with_post, plain = toy
    m = load(with_post, backend="cpu", warmup=False)
    assert {"post_attn_norm", "post_ffn_norm"} <= m.spec.features
    cpu = m.logits(IDS)
    ref = ReferenceModel(with_post).forward(IDS).logits
    assert min(cosine(cpu[t], ref[t]) for t in range(len(IDS))) > 0.99999
    cpu_plain = load(plain, backend="cpu", warmup=False).logits(IDS)
    ref_plain = ReferenceModel(plain).forward(IDS).logits
    assert cosine(cpu_plain, ref_plain) > 0.99999
    assert cosine(cpu, cpu_plain) < 0.999 and cosine(ref, ref_plain) < 0.999  # the flag changes both


def test_toy_post_norm_flag_reaches_opencl(toy):
    pytest.importorskip("pyopencl")
    from apr_numba.backends.opencl import OpenCLBackend
    from apr_numba.backends.opencl_kernels import list_devices

    if not list_devices():
        pytest.skip("no OpenCL device (PoCL is installed with the project)")
    with_post, plain = toy
    for path in (with_post, plain):
        m = load(path, backend="cpu", warmup=False)
        be = OpenCLBackend(m)
        dev = be.eval(IDS, n_logits=len(IDS), state=be.new_state(16))
        assert cosine(dev, m.logits(IDS)) > 0.99999
    post_dev = OpenCLBackend(load(with_post, backend="cpu", warmup=False))
    plain_dev = OpenCLBackend(load(plain, backend="cpu", warmup=False))
    a = post_dev.eval(IDS, n_logits=1, state=post_dev.new_state(16))
    b = plain_dev.eval(IDS, n_logits=1, state=plain_dev.new_state(16))
    assert cosine(a, b) < 0.999


def test_reference_kv_cache_eval_equals_full_forward(toy):
    ref = ReferenceModel(toy[0], budget_bytes=1 << 24)
    full = ref.forward(IDS).logits
    st = ref.new_state(32)
    first = ref.eval(IDS[:5], st, n_logits=5)
    steps = [ref.eval([t], st)[0] for t in IDS[5:]]
    np.testing.assert_allclose(first, full[:5], rtol=0, atol=1e-9)
    np.testing.assert_allclose(np.stack(steps), full[5:], rtol=0, atol=1e-9)
    assert st.n_past == len(IDS) and 0 < ref.cached_bytes <= 1 << 24


def test_unsupported_files_are_refused_from_the_header_in_under_a_second(tmp_path):
    """Fast refusal (issue 13): an unknown architecture and an unsupported tensor type are refused before the
    vocabulary is parsed; the message names what is unsupported and what is."""
    import time

    from gguf import GGMLQuantizationType as GT

    from apr_numba.model.support import refuse_unsupported

    arch = tmp_path / "arch.gguf"
    write_tiny_gguf(arch, arch="rwkv6")
    qtype = tmp_path / "type.gguf"
    write_tiny_gguf(qtype, q_type=GT.IQ2_XXS)
    for path, want in ((arch, r"unsupported architecture 'rwkv6' \(supported: llama, qwen2"),
                       (qtype, r"unsupported tensor types IQ2_XXS \(1 tensors\), e.g. tensor blk.0.attn_q.weight "
                               r"\(supported: .*Q4_K")):
        t0 = time.perf_counter()
        with pytest.raises(ModelFormatError, match=want):
            refuse_unsupported(path)
        assert time.perf_counter() - t0 < 1.0
        with pytest.raises(ModelFormatError, match=want):
            load(path, backend="cpu", warmup=False)
    ok = tmp_path / "ok.gguf"
    write_tiny_gguf(ok)
    assert refuse_unsupported(ok).arch == "llama"
