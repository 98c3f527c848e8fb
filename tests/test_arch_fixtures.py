"""The committed tiny-architecture fixtures (tests/fixtures/arch/) are consistent: gguf-py only.

Each ``<name>.gguf`` must open with ``gguf.GGUFReader``, carry the ``general.architecture`` and the exact
tensor names, types and shapes that ``<name>_ref.json`` records (written by make_arch_fixtures.py from
the same file), and the reference arrays in ``<name>_ref.npz`` must be finite with the shapes the json
states. No torch or llama.cpp here: CI has neither.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

ARCH = Path(__file__).resolve().parent / "fixtures" / "arch"
NAMES = sorted(p.name[: -len("_ref.json")] for p in ARCH.glob("*_ref.json"))
EXPECTED = {"llama-spm": "llama", "llama3": "llama", "qwen3": "qwen3", "qwen3moe": "qwen3moe", "gemma3": "gemma3"}


def test_every_architecture_has_a_fixture():
    assert sorted(EXPECTED) == NAMES


@pytest.fixture(scope="module", params=NAMES)
def fixture(request):
    meta = json.loads((ARCH / f"{request.param}_ref.json").read_text(encoding="utf-8"))
    reader = gguf.GGUFReader(str(ARCH / meta["gguf_file"]))
    return request.param, meta, reader


def test_architecture_and_tensor_types(fixture):
    name, meta, reader = fixture
    arch = reader.fields["general.architecture"].contents()
    assert arch == meta["general.architecture"] == EXPECTED[name]
    got = {t.name: {"type": t.tensor_type.name, "shape": [int(x) for x in t.shape]} for t in reader.tensors}
    assert got == meta["gguf_tensors"]
    assert reader.fields[f"{arch}.block_count"].contents() == meta["n_layer"]
    assert reader.fields[f"{arch}.embedding_length"].contents() == meta["n_embd"]
    # a realistic quantized mix, not an F32 dump: every 2-D weight is quantized except the MoE router
    # (ffn_gate_inp), which llama.cpp's converter and quantizer keep in F32
    types = {v["type"] for k, v in got.items() if len(v["shape"]) >= 2 and not k.endswith("ffn_gate_inp.weight")}
    assert types and not types & {"F32", "F16"}, types


def test_reference_arrays_finite_and_shaped(fixture):
    name, meta, _ = fixture
    ref = np.load(ARCH / f"{name}_ref.npz")
    for i in range(len(meta["prompts"])):
        logits = ref[f"last_logits_{i}"]
        assert logits.shape == (meta["n_vocab"],) and np.isfinite(logits).all()
        assert ref[f"hidden_last_{i}"].shape == (meta["n_layer"] + 1, meta["n_embd"])
        assert np.isfinite(ref[f"hidden_last_{i}"]).all() and np.isfinite(ref[f"top_vals_{i}"]).all()
        assert int(ref[f"top_ids_{i}"][0]) == int(np.argmax(logits.astype(np.float32)))
        assert ref[f"greedy_ids_{i}"].shape == (meta["n_greedy"],)
        assert ((0 <= ref[f"prompt_ids_{i}"]) & (ref[f"prompt_ids_{i}"] < meta["n_vocab"])).all()


def test_arch_specific_metadata(fixture):
    name, meta, reader = fixture
    f = reader.fields
    facts = meta["arch_facts"]
    if name == "gemma3":
        assert f["gemma3.attention.sliding_window"].contents() == facts["sliding_window"]
        assert f["gemma3.rope.freq_base"].contents() == facts["rope_theta_global"]
        assert f["gemma3.rope.freq_base_swa"].contents() == facts["rope_theta_local"]
        # llama.cpp's implied pattern 6: layer il is global iff (il + 1) % 6 == 0
        implied = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(meta["n_layer"])]
        assert facts["layer_types"] == implied
    elif name == "qwen3moe":
        assert f["qwen3moe.expert_count"].contents() == facts["n_expert"]
        assert f["qwen3moe.expert_used_count"].contents() == facts["n_expert_used"]
        gate = next(t for t in reader.tensors if t.name == "blk.0.ffn_gate_exps.weight")
        assert [int(x) for x in gate.shape] == [meta["n_embd"], facts["moe_intermediate_size"], facts["n_expert"]]
    elif name == "llama3":
        freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        assert np.asarray(freqs.data).max() == facts["rope_parameters"]["factor"]
