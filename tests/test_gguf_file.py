"""GGUFFile (apr_numba/formats/gguf_file.py): every malformed file becomes a ModelFormatError naming the file, tensor
extents are validated, and the start-up cache in ``$APR_NUMBA_CACHE`` is used, equivalent and invalidated.

Mutated files are tmp copies (a tiny llama GGUF written with ``gguf.GGUFWriter``, or prefixes of the real
SmolLM2 file); the cache always points into tmp_path.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from apr_numba.errors import ModelFormatError
from apr_numba.formats.gguf_file import _BIG_KEYS, GGUFFile, cache_dir
from tests.tiny_gguf import write_tiny_gguf

ROOT = Path(__file__).resolve().parent.parent
SMOLLM = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
needs_smollm = pytest.mark.skipif(not SMOLLM.is_file(), reason=f"needs {SMOLLM.name}")


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("APR_NUMBA_CACHE", str(d))
    return d


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    arrays = write_tiny_gguf(path)
    return path, arrays


@pytest.fixture
def tiny(tmp_path, tiny_src) -> Path:
    """A fresh copy of the tiny GGUF (safe to mutate)."""
    dst = tmp_path / "tiny.gguf"
    shutil.copyfile(tiny_src[0], dst)
    return dst


def raises_naming(path: Path, match: str | None = None) -> str:
    """Open ``path``; assert a ModelFormatError whose message names the file; return the message."""
    with pytest.raises(ModelFormatError) as ei:
        GGUFFile(path)
    msg = str(ei.value)
    assert str(path) in msg
    if match is not None:
        assert match in msg
    return msg


# -- valid file ------------------------------------------------------------------------------

def test_tiny_file_opens_and_data_is_zero_copy_and_exact(tiny_src):
    path, arrays = tiny_src
    f = GGUFFile(path)
    assert f.metadata["general.architecture"] == "llama"
    assert f.metadata["llama.embedding_length"] == 64
    assert set(f.tensors) == set(arrays)
    for name, a in arrays.items():
        t = f.tensors[name]
        assert t.shape == a.shape  # NumPy order (GGUF ne reversed)
        assert t.type_name == "F32" and t.nbytes == a.nbytes
        raw = f.data(name)
        assert raw.dtype == np.uint8 and raw.size == a.nbytes
        np.testing.assert_array_equal(raw.view(np.float32).reshape(a.shape), a)
    assert f.has("token_embd.weight") and not f.has("output.weight")
    with pytest.raises(ModelFormatError, match="missing"):
        f.data("output.weight")


# -- missing / not GGUF -----------------------------------------------------------------------

def test_missing_file(tmp_path):
    raises_naming(tmp_path / "nope.gguf", "no such model file")


def test_directory_is_not_a_model_file(tmp_path):
    d = tmp_path / "dir.gguf"
    d.mkdir()
    raises_naming(d)


@pytest.mark.parametrize("content", [b"", b"GG", b"hello world, this is not a model\n", b"\x00" * 64,
                                     b"PK\x03\x04" + b"\x00" * 60])
def test_not_gguf(tmp_path, content):
    p = tmp_path / "x.gguf"
    p.write_bytes(content)
    raises_naming(p, "not a GGUF file")


# -- truncated --------------------------------------------------------------------------------

def _tiny_cut_points(path: Path) -> dict[str, int]:
    """Named cut points through every region of the tiny file: header, metadata, tensor infos, data."""
    r = GGUFReader(path)
    size = path.stat().st_size
    fields = r.fields
    tokens = fields["tokenizer.ggml.tokens"]
    first_kv = fields["general.architecture"]
    tinfo = r.tensors[0].field
    last = r.tensors[-1]
    return {
        "magic_only": 4, "mid_version": 6, "version": 8, "mid_tensor_count": 12, "counts": 24,
        "mid_first_key": first_kv.offset + 3, "after_first_kv": first_kv.offset + sum(p.nbytes for p in first_kv.parts),
        "mid_token_list": tokens.offset + 200, "mid_tensor_info": tinfo.offset + 5,
        "before_data": r.data_offset - 1,
        "data_start": r.data_offset, "data_start_plus_1": r.data_offset + 1,
        "mid_data": (r.data_offset + size) // 2, "in_last_tensor": int(last.data_offset) + 8,
        "one_byte_short": size - 1,
    }


CUTS = ["magic_only", "mid_version", "version", "mid_tensor_count", "counts", "mid_first_key", "after_first_kv",
        "mid_token_list", "mid_tensor_info", "before_data", "data_start", "data_start_plus_1", "mid_data",
        "in_last_tensor", "one_byte_short"]


@pytest.mark.parametrize("where", CUTS)
def test_truncated_tiny(tmp_path, tiny_src, where):
    src = tiny_src[0]
    cut = _tiny_cut_points(src)[where]
    assert 0 < cut < src.stat().st_size
    p = tmp_path / f"cut_{where}.gguf"
    p.write_bytes(src.read_bytes()[:cut])
    raises_naming(p)


def test_truncated_every_byte_of_header_region(tmp_path, tiny_src):
    """Every cut in the first 768 bytes (header and first metadata keys) and a stride through the rest:
    whatever gguf's reader raises internally, GGUFFile raises ModelFormatError naming the file."""
    data = tiny_src[0].read_bytes()
    p = tmp_path / "cut.gguf"
    for cut in list(range(0, 768)) + list(range(768, len(data), 3001)):
        p.write_bytes(data[:cut])
        raises_naming(p)


@needs_smollm
@pytest.mark.parametrize("cut", [24, 1000, 1_000_000])
def test_truncated_real_file_in_metadata(tmp_path, cut):
    p = tmp_path / "smollm_cut.gguf"
    with open(SMOLLM, "rb") as fh:
        p.write_bytes(fh.read(cut))
    raises_naming(p)


# -- tensor extents ---------------------------------------------------------------------------

def test_tensor_offset_past_end_in_header(tiny, tiny_src):
    """A tensor-info offset pointing past the end of the file (patched in the header)."""
    r = GGUFReader(tiny, "r+")
    r.tensors[-1].field.parts[-1][0] = tiny.stat().st_size  # offset is relative to the data section
    r.data.flush()
    del r
    assert tiny.read_bytes() != tiny_src[0].read_bytes()
    raises_naming(tiny)


def _cached(tiny: Path) -> tuple[GGUFFile, Path, dict]:
    f = GGUFFile(tiny)
    f.save_cache(None)
    p = f._cache_path()
    return f, p, json.loads(p.read_text())


def test_tensor_past_end_from_cache_is_validated(tiny):
    """The cache is not trusted blindly: extents from it are checked against the file too."""
    _, p, d = _cached(tiny)
    size = tiny.stat().st_size
    d["tensors"]["blk.0.ffn_down.weight"][2] = size - 16  # offset: 16 bytes before the end
    p.write_text(json.dumps(d))
    msg = raises_naming(tiny, "blk.0.ffn_down.weight")
    assert "past the end" in msg


def test_tensor_bytes_disagreeing_with_shape_from_cache(tiny):
    _, p, d = _cached(tiny)
    d["tensors"]["blk.0.attn_q.weight"][3] -= 4
    p.write_text(json.dumps(d))
    raises_naming(tiny, "blk.0.attn_q.weight")


# -- start-up cache ---------------------------------------------------------------------------

def _tensor_table(f: GGUFFile) -> dict:
    return {n: (t.ggml_type, t.shape, t.offset, t.nbytes) for n, t in f.tensors.items()}


def check_cache_roundtrip(path: Path, cache: Path) -> GGUFFile:
    """Open ``path`` with an empty cache (parse), save the cache, open again (hit): equal results.
    Returns the parsed GGUFFile."""
    assert cache_dir() == cache and not list(cache.glob("gguf-*.json"))
    first = GGUFFile(path)
    assert not first.from_cache and first.tokenizer_json is None
    assert any(k in first.metadata for k in _BIG_KEYS)
    first.save_cache('{"tok": 1}')
    assert len(list(cache.glob("gguf-*.json"))) == 1

    second = GGUFFile(path)
    assert second.from_cache
    assert second.tokenizer_json == '{"tok": 1}'
    expect = {k: v for k, v in first.metadata.items() if k not in _BIG_KEYS}
    assert set(second.metadata) == set(expect)
    for k, v in expect.items():
        got = second.metadata[k]
        if isinstance(v, list):
            assert list(got) == list(v), k
        else:
            assert got == v, k
    assert _tensor_table(second) == _tensor_table(first)
    assert second.file_size == first.file_size
    name = next(iter(first.tensors))
    np.testing.assert_array_equal(second.data(name), first.data(name))
    return first


def test_cache_hit_is_equivalent(tiny, tmp_cache):
    check_cache_roundtrip(tiny, tmp_cache)
    assert not GGUFFile(tiny, use_cache=False).from_cache  # use_cache=False always parses


@needs_smollm
def test_real_file_table_matches_gguf_reader_and_cache_roundtrips(tmp_cache):
    f = check_cache_roundtrip(SMOLLM, tmp_cache)
    r = GGUFReader(SMOLLM)
    assert len(f.tensors) == len(r.tensors)
    for t in r.tensors:
        ref = f.tensors[t.name]
        assert ref.ggml_type == int(t.tensor_type)
        assert ref.shape == tuple(int(x) for x in reversed(t.shape))  # NumPy order
        assert ref.offset == int(t.data_offset) and ref.nbytes == int(t.n_bytes)
        assert ref.offset + ref.nbytes <= f.file_size


def test_cache_invalidated_by_mtime_change(tiny):
    GGUFFile(tiny).save_cache(None)
    assert GGUFFile(tiny).from_cache
    st = tiny.stat()
    os.utime(tiny, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    f = GGUFFile(tiny)
    assert not f.from_cache
    assert "tokenizer.ggml.tokens" in f.metadata


def test_cache_invalidated_by_size_change(tiny):
    GGUFFile(tiny).save_cache(None)
    st = tiny.stat()
    with open(tiny, "ab") as fh:
        fh.write(b"\x00" * 32)
    os.utime(tiny, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime, different size
    assert not GGUFFile(tiny).from_cache


def test_cache_keyed_by_path(tiny, tmp_path):
    GGUFFile(tiny).save_cache(None)
    other = tmp_path / "other.gguf"
    shutil.copy2(tiny, other)  # same size and mtime, other path
    assert not GGUFFile(other).from_cache


@pytest.mark.parametrize("garbage", ["", "{not json", "[]", "3", '{"metadata": {}}', '{"metadata": {}, "tensors": 3}',
                                     '{"metadata": 3, "tensors": {}}', '{"metadata": {}, "tensors": {"a": 1}}',
                                     '{"metadata": {}, "tensors": {"a": ["x", [1], 0, 4]}}',
                                     '{"metadata": {}, "tensors": {"a": [0, [1]]}}'])
def test_corrupt_cache_falls_back_to_parsing(tiny, garbage):
    f = GGUFFile(tiny)
    f.save_cache(None)
    f._cache_path().write_text(garbage)
    g = GGUFFile(tiny)
    assert not g.from_cache
    assert _tensor_table(g) == _tensor_table(f)


def test_unwritable_cache_dir_is_not_an_error(tiny, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setenv("APR_NUMBA_CACHE", str(blocker / "sub"))
    f = GGUFFile(tiny)
    f.save_cache(None)  # cannot create the folder: silently skipped
    assert not GGUFFile(tiny).from_cache
