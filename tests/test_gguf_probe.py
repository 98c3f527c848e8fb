"""``probe_gguf`` (the header read that refuses unsupported files before the vocabulary is parsed) against
gguf-py's ``GGUFReader`` (llama.cpp's reader), and its errors on a vocabulary whose string lengths run past the
end: the fast skip over string arrays must give the same answers and the same messages as the full walk."""

from __future__ import annotations

import struct

import pytest
from gguf import GGUFReader, GGUFValueType

from apr_numba.errors import ModelFormatError
from apr_numba.formats.gguf_header import _walk, probe_gguf
from tests.tiny_gguf import write_tiny_gguf


@pytest.fixture()
def tiny(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    return path


def test_probe_matches_gguf_py(tiny):
    meta, infos = probe_gguf(tiny)
    r = GGUFReader(str(tiny))
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue
        if f.types[0] == GGUFValueType.ARRAY:
            assert meta[key] is None, key  # skipped, not parsed
        else:
            want = f.contents()
            assert meta[key] == pytest.approx(want) if isinstance(want, float) else meta[key] == want, key
    assert len(r.fields["tokenizer.ggml.tokens"].data) == 300  # the array that was stepped over is a real one
    got = {name: (tuple(int(x) for x in ne), int(t), int(off)) for name, ne, t, off in infos}
    want = {t.name: (tuple(int(x) for x in t.shape), int(t.tensor_type), int(t.data_offset - r.data_offset))
            for t in r.tensors}
    assert got == want


@pytest.mark.parametrize("where", ["middle", "last"])
def test_string_length_past_the_end_is_refused_like_the_full_walk(tiny, tmp_path, where):
    data = bytearray(tiny.read_bytes())
    piece = b"<extra_5>" if where == "middle" else f"<extra_{300 - 258}>".encode()  # the last token
    at = data.index(struct.pack("<Q", len(piece)) + piece)
    data[at:at + 8] = struct.pack("<Q", len(data))  # runs past the end of the file
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError) as fast:
        probe_gguf(bad)
    with pytest.raises(ModelFormatError) as full:
        _walk(bad, True)
    msg = str(fast.value)
    assert str(bad) in msg and "tokenizer.ggml.tokens" in msg and f"at byte {at + 8}" in msg, msg
    assert msg == str(full.value)
