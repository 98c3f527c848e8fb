"""GGUF / safetensors -> .apr import (apr_numba/formats/apr_import.py), the CLI (import, pull --apr, inspect, run on
.apr), running real models from .apr bit-identically, and GGUF bad-input hardening (apr_numba/formats/gguf_header.py).

The real-model .apr files are written once per session under a temporary models folder (the registry GGUF
files symlinked into it, so ``apr-numba pull NAME --apr`` runs for real) and deleted afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from apr_numba.cli.main import main
from apr_numba.errors import ModelFormatError
from apr_numba.formats import apr_format as af
from apr_numba.formats.apr_file import AprFile
from apr_numba.formats.apr_import import import_model, read_safetensors
from apr_numba.formats.apr_meta import apr_to_gguf_name, gguf_to_apr_name
from apr_numba.formats.gguf_file import GGUFFile
from apr_numba.formats.gguf_header import check_gguf, read_gguf
from apr_numba.hub.registry import get_entry, models_dir
from apr_numba.model.decoder import load
from tests.apr_testlib import write_tiny_gguf

ROOT = Path(__file__).resolve().parent.parent
QUANT = {"blk.0.attn_q.weight": T.Q8_0, "blk.0.attn_k.weight": T.Q4_0, "blk.0.attn_v.weight": T.Q4_1,
         "blk.0.ffn_up.weight": T.Q5_0, "blk.0.ffn_gate.weight": T.F16, "token_embd.weight": T.Q8_0}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    g = d / "tiny.gguf"
    write_tiny_gguf(g, QUANT)
    return g, import_model(g, d / "tiny.apr")


def _same_tensors(gguf_path: Path, apr: AprFile) -> None:
    meta, table = read_gguf(gguf_path)
    mm = np.memmap(gguf_path, dtype=np.uint8, mode="r")
    assert set(apr.tensors) == set(table)
    for name, t in table.items():
        a = apr.tensors[name]
        assert (a.ggml_type, a.shape, a.nbytes, a.apr_name) == (t.ggml_type, t.shape, t.nbytes, gguf_to_apr_name(name))
        assert np.array_equal(apr.data(name), mm[t.offset:t.offset + t.nbytes]), name
    for k, v in meta.items():  # every GGUF key comes back with its value
        assert apr.metadata[k] == v, k


def test_tiny_gguf_import_is_lossless(tiny):
    g, r = tiny
    f = AprFile(r.path)
    _same_tensors(g, f)
    assert f.footer_crc == f.footer_crc_computed
    assert set(f.flags) == {"QUANTIZED", "HAS_VOCAB", "LAYOUT_ROW_MAJOR"}
    names = [e.name for e in f.entries]
    assert names == sorted(names, key=str.encode)
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.embed_tokens.weight" in names
    m = f.apr_metadata
    assert (m["architecture"], m["hidden_size"], m["num_layers"], m["num_heads"], m["vocab_size"]) == ("llama", 64, 1,
                                                                                                    2, 300)
    assert m["rope_type"] == 0 and m["tied_embeddings"] is True and m["original_format"] == "gguf"
    assert m["tokenizer.vocabulary"][:2] == GGUFFile(g, use_cache=False).metadata["tokenizer.ggml.tokens"][:2]
    assert m["tokenizer.merges"] == ["t o"] and m["tokenizer.pre_type"] == "smollm" and m["tokenizer.model"] == "gpt2"
    assert m["tokenizer.bos_token_id"] == 0 and m["tokenizer.eos_token_id"] == 1
    assert m["tokenizer.token_type"][:3] == [3, 3, 1] and m["chat_template"].startswith("{% for m")
    assert m[af.Q8_0_MARKER_KEY] == af.Q8_0_MARKER
    assert all(e.size % 1 == 0 and e.offset % 64 == 0 for e in f.entries)


def test_tiny_logits_bit_identical(tiny):
    g, r = tiny
    mg, ma = load(g, n_ctx=16, warmup=False), load(r.path, n_ctx=16, warmup=False)
    ids = [5, 77, 256, 3, 299]
    assert np.array_equal(mg.logits(ids), ma.logits(ids))
    assert mg.encode("to be") == ma.encode("to be") and ma.tokenizer.chat_template == mg.tokenizer.chat_template


def test_names_map_both_ways():
    for gname, hname in [("blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj.weight"),
                         ("blk.0.attn_k.bias", "model.layers.0.self_attn.k_proj.bias"),
                         ("blk.1.attn_output.weight", "model.layers.1.self_attn.o_proj.weight"),
                         ("blk.2.attn_norm.weight", "model.layers.2.input_layernorm.weight"),
                         ("blk.2.ffn_norm.weight", "model.layers.2.post_attention_layernorm.weight"),
                         ("blk.9.ffn_down.weight", "model.layers.9.mlp.down_proj.weight"),
                         ("token_embd.weight", "model.embed_tokens.weight"), ("output.weight", "lm_head.weight"),
                         ("output_norm.weight", "model.norm.weight"), ("rope_freqs.weight", "rope_freqs.weight")]:
        assert gguf_to_apr_name(gname) == hname and apr_to_gguf_name(hname) == gname
        assert apr_to_gguf_name(gname) == gname  # GGUF-style stored names are read too


def test_import_and_inspect_cli(tiny, tmp_path, capsys):
    g, _ = tiny
    out = tmp_path / "cli.apr"
    assert main(["import", str(g), "-o", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["path"] == str(out) and res["tensors"] == 11 and res["file_bytes"] == out.stat().st_size
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    a = info["apr"]
    assert info["format"] == "APR" and info["architecture"] == "llama" and info["config"]["n_layer"] == 1
    assert a["header"]["version"] == "2.0" and a["header"]["tensor_count"] == 11
    assert a["header"]["flag_names"] == ["QUANTIZED", "HAS_VOCAB", "LAYOUT_ROW_MAJOR"]
    assert a["checksums"]["header_crc32_ok"] and a["checksums"]["footer_crc32_ok"]
    assert a["metadata"]["tokenizer.vocabulary"].startswith("<list of 300 items")
    assert a["totals"]["tensors"] == 11 and a["totals"]["file_bytes"] == out.stat().st_size
    t = {x["name"]: x for x in info["tensors"]}["model.layers.0.self_attn.q_proj.weight"]
    assert (t["dtype"], t["dtype_byte"], t["shape"]) == ("Q8_0", 8, [64, 64]) and t["bytes"] == 64 * 2 * 34
    assert main(["inspect", str(out)]) == 0  # rich tables
    text = capsys.readouterr().out
    assert "APR v2 header" in text and "footer_crc32_ok" in text and "LAYOUT_ROW_MAJOR" in text


def test_import_default_output_and_errors(tiny, tmp_path, capsys):
    g, _ = tiny
    src = tmp_path / "copy.gguf"
    shutil.copy(g, src)
    assert main(["import", str(src)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "copy.apr")
    (tmp_path / "junk.bin").write_bytes(b"junk" * 10)
    assert main(["import", str(tmp_path / "junk.bin")]) == 2
    assert "not a GGUF file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ real models
@pytest.fixture(scope="session")
def pulled_apr(tmp_path_factory):
    """name -> (gguf path, .apr path, import seconds): `apr-numba pull NAME --apr` in a temporary models folder
    holding symlinks to the registry GGUF files; removed at the end of the session."""
    root = tmp_path_factory.mktemp("models")
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            entry = get_entry(name)
            src = entry.local_path(models_dir())
            if not src.is_file():
                pytest.skip(f"{name} is not pulled")
            (root / src.name).symlink_to(src)
            old = os.environ.get("APR_NUMBA_MODELS")
            os.environ["APR_NUMBA_MODELS"] = str(root)
            try:
                t0 = time.perf_counter()
                r = subprocess.run([sys.executable, "-m", "apr_numba", "pull", name, "--apr"], capture_output=True,
                                   text=True, cwd=ROOT)
                secs = time.perf_counter() - t0
            finally:
                if old is None:
                    del os.environ["APR_NUMBA_MODELS"]
                else:
                    os.environ["APR_NUMBA_MODELS"] = old
            assert r.returncode == 0, r.stderr
            lines = r.stdout.split()
            assert lines == [str(root / src.name), str((root / src.name).with_suffix(".apr"))]
            cache[name] = (root / src.name, Path(lines[1]), secs)
        return cache[name]

    yield get
    shutil.rmtree(root, ignore_errors=True)


def _run_json(model: Path, prompt: str, n: int, capsys) -> dict:
    assert main(["run", str(model), "-p", prompt, "-n", str(n), "--json", "--n-ctx", "256"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name, prompt", [("smollm2-135m", "The three primary colors are"),
                                          ("qwen2.5-coder-0.5b", "def fibonacci(n):")])
def test_real_model_apr_is_lossless_and_runs_identically(pulled_apr, loaded_model, capsys, name, prompt):
    gguf, apr_path, secs = pulled_apr(name)
    f = AprFile(apr_path)
    _same_tensors(gguf, f)
    assert f.footer_crc == f.footer_crc_computed
    sys.stderr.write(f"{name}: pull --apr {secs:.1f}s, {apr_path.stat().st_size:,} bytes "
                     f"(.gguf {gguf.stat().st_size:,})\n")
    mg = loaded_model(name)
    ma = load(apr_path, n_ctx=512)
    assert ma.config == mg.config
    ids = mg.encode(prompt)
    assert ma.encode(prompt) == ids
    assert np.array_equal(ma.logits(ids), mg.logits(ids))
    del ma
    ra, rg = _run_json(apr_path, prompt, 12, capsys), _run_json(gguf, prompt, 12, capsys)
    assert ra["token_ids"] == rg["token_ids"] and ra["text"] == rg["text"] and len(ra["token_ids"]) > 0


def test_pull_apr_reuses_a_valid_apr(pulled_apr):
    from apr_numba.cli.apr_cmds import pull_apr

    gguf, apr_path, _ = pulled_apr("smollm2-135m")
    mtime = apr_path.stat().st_mtime_ns
    assert pull_apr(gguf) == apr_path and apr_path.stat().st_mtime_ns == mtime


def test_apr_run_console_script(pulled_apr):
    _, apr_path, _ = pulled_apr("smollm2-135m")
    r = subprocess.run([sys.executable, "-m", "apr_numba", "run", str(apr_path), "-p", "Hello", "-n", "4", "--json"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"] == str(apr_path)


def test_minilm_safetensors_import_round_trips(tmp_path):
    from safetensors.numpy import load_file

    d = models_dir() / get_entry("minilm-l6").path
    if not (d / "model.safetensors").is_file():
        pytest.skip("minilm-l6 is not pulled")
    r = import_model(d, tmp_path / "minilm.apr")
    f = AprFile(r.path)
    ref = load_file(str(d / "model.safetensors"))
    assert set(f.tensors) == set(ref)
    for name, arr in ref.items():
        t = f.tensors[name]
        assert t.shape == arr.shape and t.nbytes == arr.nbytes, name
        assert f.data(name).tobytes() == np.ascontiguousarray(arr).tobytes(), name
    assert f.tensors["embeddings.position_ids"].type_name == "I64"
    m = f.apr_metadata
    cfg = json.loads((d / "config.json").read_text())
    assert (m["model_type"], m["hidden_size"], m["num_layers"], m["num_heads"]) == ("bert", 384, 6, 12)
    assert m["hf.config"] == cfg and m["hf.tokenizer_json"] == (d / "tokenizer.json").read_text()
    assert m["tokenizer.model"] == "wordpiece" and len(m["tokenizer.vocabulary"]) == 30522
    assert m["tokenizer.vocabulary"][101] == "[CLS]" and "HAS_VOCAB" in f.flags and "QUANTIZED" not in f.flags


def test_safetensors_dir_keeps_f16_bf16_f32(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    rng = np.random.default_rng(1)
    arrs = {"model.embed_tokens.weight": rng.standard_normal((8, 4)).astype("<f2").tobytes(),
            "model.norm.weight": rng.integers(0, 2**16, 4, dtype="<u2").tobytes(),  # BF16 bit patterns
            "lm_head.weight": rng.standard_normal((8, 4)).astype("<f4").tobytes()}
    header, off = {}, 0
    for (name, raw), (dt, shape) in zip(arrs.items(), [("F16", [8, 4]), ("BF16", [4]), ("F32", [8, 4])],
                                        strict=True):
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
    _safetensors(d / "model.safetensors", header, b"".join(arrs.values()))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4, "num_hidden_layers": 1,
                                               "num_attention_heads": 1, "vocab_size": 8, "bos_token_id": 1}))
    (d / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2},
                                                            "merges": [["a", "b"]]}, "added_tokens": []}))
    r = import_model(d, tmp_path / "hf.apr", progress=True)
    f = AprFile(r.path)
    assert {e.name: e.dtype_name for e in f.entries} == {"lm_head.weight": "F32", "model.embed_tokens.weight": "F16",
                                                         "model.norm.weight": "BF16"}
    for name, raw in arrs.items():
        assert f.data(apr_to_gguf_name(name)).tobytes() == raw
    m = f.apr_metadata
    assert m["tokenizer.vocabulary"] == ["a", "b", "ab"] and m["tokenizer.merges"] == ["a b"]
    assert m["tokenizer.model"] == "bpe" and m["tokenizer.bos_token_id"] == 1 and m["tied_embeddings"] is False
    assert f.metadata["tokenizer.ggml.model"] == "gpt2" and f.metadata["llama.embedding_length"] == 4


def _safetensors(path: Path, header: dict | bytes, data: bytes = b"") -> Path:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


@pytest.mark.parametrize("header, data, words", [
    (b"", b"", "shorter"), ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "outside"),
    ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "disagree"),
    ({"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "cannot store"),
    ({"x": {"dtype": "F32"}}, b"", "malformed"), (b"[1]", b"", "not a JSON object"), (b"{x", b"", "not JSON"),
])
def test_bad_safetensors(tmp_path, header, data, words):
    p = tmp_path / "m.safetensors"
    if header == b"":
        p.write_bytes(b"\x01\x02")
    else:
        _safetensors(p, header, data)
    with pytest.raises(ModelFormatError, match=words):
        read_safetensors(p)


def test_safetensors_header_length_past_end(tmp_path):
    p = tmp_path / "m.safetensors"
    p.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(ModelFormatError, match="runs past the end"):
        read_safetensors(p)


def test_safetensors_dir_missing_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelFormatError, match="tokenizer.json is missing"):
        import_model(tmp_path, tmp_path / "x.apr")


# ------------------------------------------------------------------------------------------ GGUF bad input
def _s(x: str) -> bytes:
    b = x.encode()
    return struct.pack("<Q", len(b)) + b


GGUF_HEAD = b"GGUF" + struct.pack("<I", 3)
BAD_GGUF = {
    "huge_tensor_count": (GGUF_HEAD + struct.pack("<QQ", 2**62, 0), "tensor infos cannot fit"),
    "huge_kv_count": (GGUF_HEAD + struct.pack("<QQ", 0, 2**62), "key/value pairs cannot fit"),
    "huge_key_length": (GGUF_HEAD + struct.pack("<QQ", 0, 1) + struct.pack("<Q", 2**62) + b"abc" * 10, "key 0"),
    "huge_string_value": (GGUF_HEAD + struct.pack("<QQ", 0, 1) + _s("general.name") + struct.pack("<IQ", 8, 2**40)
                          + b"x" * 10, "value of 'general.name'"),
    "huge_string_array": (GGUF_HEAD + struct.pack("<QQ", 0, 1) + _s("tokenizer.ggml.tokens")
                          + struct.pack("<IIQ", 9, 8, 2**40) + b"x" * 10, "strings cannot fit"),
    "huge_u8_array": (GGUF_HEAD + struct.pack("<QQ", 0, 1) + _s("x") + struct.pack("<IIQ", 9, 0, 2**40) + b"x" * 10,
                      "items"),
    "huge_nested_array": (GGUF_HEAD + struct.pack("<QQ", 0, 1) + _s("x") + struct.pack("<IIQ", 9, 9, 2**40)
                          + b"x" * 10, "arrays cannot fit"),
    "huge_n_dims": (GGUF_HEAD + struct.pack("<QQ", 1, 0) + _s("t") + struct.pack("<I", 2**31) + bytes(64),
                    "dimensions"),
    "unknown_value_type": (GGUF_HEAD + struct.pack("<QQ", 0, 1) + _s("x") + struct.pack("<I", 99) + bytes(16),
                           "unknown value type 99"),
    "unknown_item_type": (GGUF_HEAD + struct.pack("<QQ", 0, 1) + _s("x") + struct.pack("<IIQ", 9, 77, 1) + bytes(16),
                          "unknown array item type 77"),
    "truncated_header": (GGUF_HEAD + b"\0" * 4, "shorter than the 24-byte header"),
    "bad_version": (b"GGUF" + struct.pack("<IQQ", 7, 0, 0), "unsupported GGUF version 7"),
    "truncated_tensor_info": (GGUF_HEAD + struct.pack("<QQ", 1, 0) + _s("t") + struct.pack("<I", 2) + bytes(12),
                              "dims, type and offset"),
}


@pytest.mark.parametrize("case", sorted(BAD_GGUF))
def test_bad_gguf_fails_fast_without_large_allocation(tmp_path, case):
    data, words = BAD_GGUF[case]
    p = tmp_path / f"{case}.gguf"
    p.write_bytes(data + bytes(max(0, 24 - len(data))) if case != "truncated_header" else data)
    for opener in (lambda: GGUFFile(p, use_cache=False), lambda: read_gguf(p), lambda: import_model(p, tmp_path / "o")):
        tracemalloc.start()
        try:
            t0 = time.perf_counter()
            with pytest.raises(ModelFormatError) as ei:
                opener()
            secs = time.perf_counter() - t0
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert str(p) in str(ei.value) and words in str(ei.value), str(ei.value)
        assert secs < 2.0 and peak < 4 << 20, (secs, peak)


@pytest.mark.parametrize("cut", [30, 1000, 100_000, 1_000_000])
def test_truncated_real_gguf_metadata(tmp_path, cut):
    src = models_dir() / get_entry("smollm2-135m").path
    if not src.is_file():
        pytest.skip("smollm2-135m is not pulled")
    p = tmp_path / "cut.gguf"
    with open(src, "rb") as fh:
        p.write_bytes(fh.read(cut))
    with pytest.raises(ModelFormatError, match="corrupt or truncated"):
        check_gguf(p)
    with pytest.raises(ModelFormatError, match="corrupt or truncated"):
        import_model(p, tmp_path / "cut.apr")


def test_read_gguf_equals_gguf_reader(tiny):
    g, _ = tiny
    ref = GGUFFile(g, use_cache=False)
    meta, tensors = read_gguf(g)
    assert tensors == ref.tensors
    assert meta == ref.metadata and all(type(meta[k]) is type(v) for k, v in ref.metadata.items())
