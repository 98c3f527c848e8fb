"""Property-based fuzzing of the .apr reader (hypothesis): mutated headers, index entries, metadata and
truncations of small valid files either load or raise ModelFormatError naming the file, never anything
else, and every tensor view of a file that loads lies inside the file.

Mutations (header fields, index entry fields, random header / index / metadata bytes, truncation) are
applied with and without recomputing both CRC32s, so that the checks behind the checksums are reached
too. 2,000 container cases and 300 whole-model (``apr_numba.load``, header and index mutations) cases
run with the normal test suite (CI), and 300 cases of config / tokenizer metadata values of
any JSON type.
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apr_numba.errors import ModelFormatError
from apr_numba.formats import apr_format as af
from apr_numba.formats.apr_file import AprFile
from apr_numba.formats.apr_meta import gguf_to_apr_name
from apr_numba.quants.layouts import SUPPORTED_TYPES, decode_codes
from tests.apr_testlib import assemble, quantize_apr_q4, refresh_crcs, tiny_apr_metadata, tiny_tensors

_TMP = Path(tempfile.mkdtemp(prefix="apr-fuzz-"))
HEADER_FIELDS = [(4, "B"), (5, "B"), (6, "H"), (8, "I"), (12, "Q"), (20, "I"), (24, "Q"), (32, "Q"), (40, "I")]


def _container() -> tuple[bytes, dict]:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    q8 = quantize(x, GGMLQuantizationType.Q8_0).tobytes()
    meta = {"model_type": "llama", "architecture": "llama", "num_layers": 1, "tokenizer.vocabulary": ["a", "b"],
            "special_tokens": {"bos_token_id": 0}, af.Q8_0_MARKER_KEY: af.Q8_0_MARKER}
    tensors = [("a.f32", 0, [2, 3], x[:, :3].tobytes()), ("b.q8_0", 8, [2, 64], q8),
               ("c.aprq4", 128, [2, 40], quantize_apr_q4(x[:, :40])), ("d.f16", 1, [5], bytes(10))]
    return assemble(meta, tensors)


def _model() -> tuple[bytes, dict]:
    specs = [(gguf_to_apr_name(n), 0, list(a.shape), a.tobytes()) for n, a in tiny_tensors().items()]
    specs.sort(key=lambda s: s[0].encode())
    return assemble(tiny_apr_metadata(), specs)


CONTAINER = _container()
MODEL = _model()


def _entry_fields(data: bytes, entry_pos: list[int]) -> list[tuple[int, str]]:
    """(absolute position, struct format) of every field of every index entry."""
    out = []
    for p in entry_pos:
        (nlen,) = struct.unpack_from("<H", data, p)
        q = p + 2 + nlen
        ndim = data[q + 1]
        out += [(p, "H"), (q, "B"), (q + 1, "B")] + [(q + 2 + 8 * i, "Q") for i in range(ndim)]
        out += [(q + 2 + 8 * ndim, "Q"), (q + 10 + 8 * ndim, "Q")]
    return out


ALL_KINDS = ("header_field", "index_field", "header_bytes", "index_bytes", "meta_bytes", "truncate")


@st.composite
def mutations(draw, base, kinds=ALL_KINDS):
    data, pos = base
    b = bytearray(data)
    kind = draw(st.sampled_from(kinds))
    if kind in ("header_field", "index_field"):
        fields = HEADER_FIELDS if kind == "header_field" else _entry_fields(data, pos["entry_pos"])
        for _ in range(draw(st.integers(1, 3))):
            off, fmt = draw(st.sampled_from(fields))
            bits = struct.calcsize(fmt) * 8
            (old,) = struct.unpack_from("<" + fmt, b, off)
            new = draw(st.one_of(st.integers(0, 2**bits - 1), st.integers(-130, 130).map(lambda d, o=old: o + d),
                                 st.sampled_from([0, 1, 2**bits - 1, 2**(bits - 1)])))
            struct.pack_into("<" + fmt, b, off, new % 2**bits)
    elif kind == "truncate":
        b = b[:draw(st.integers(0, len(b) - 1))]
    else:
        lo, hi = {"header_bytes": (0, 64), "index_bytes": (pos["index_offset"], pos["data_offset"]),
                  "meta_bytes": (64, 64 + pos["metadata_size"])}[kind]
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(lo, hi - 1))
            b[i] = draw(st.integers(0, 255))
    out = bytes(b)
    if draw(st.booleans()) or kind.endswith("field"):
        out = refresh_crcs(out)
    return out


def _check(data: bytes, name: str) -> AprFile | None:
    p = _TMP / name
    p.write_bytes(data)
    try:
        f = AprFile(p)
    except ModelFormatError as exc:
        assert str(p) in str(exc)
        return None
    size = len(data)
    for gname, t in f.tensors.items():
        assert t.offset >= f.header.data_offset and t.offset + t.nbytes <= size - 4
        d = f.data(gname)
        assert d.size == t.nbytes
        if t.ggml_type in SUPPORTED_TYPES and 1 <= len(t.shape) <= 2 and t.nbytes:
            shape = (1, t.shape[0]) if len(t.shape) == 1 else t.shape
            try:
                decode_codes(t.ggml_type, d, shape, gname)
            except ModelFormatError:
                pass
    return f


def test_unmutated_files_load():
    assert _check(CONTAINER[0], "c.apr") is not None
    assert _check(MODEL[0], "m.apr") is not None


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations(CONTAINER))
def test_fuzz_container(data):
    _check(data, "fuzz.apr")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations(MODEL, ("header_field", "index_field", "header_bytes", "index_bytes", "truncate")))
def test_fuzz_whole_model_load(data):
    from apr_numba.model.decoder import load

    p = _TMP / "fuzz-model.apr"
    p.write_bytes(data)
    try:
        m = load(p, n_ctx=8, warmup=False)
    except ModelFormatError as exc:
        assert str(p) in str(exc) or "tokenizer" in str(exc) or "n_head" in str(exc), str(exc)
        return
    assert m.config.n_layer >= 1


META_KEYS = ["hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size", "head_dim",
             "max_position_embeddings", "rope_theta", "rms_norm_eps", "architecture", "model_type", "rope_type",
             "tokenizer.vocabulary", "tokenizer.merges", "tokenizer.model", "tokenizer.pre_type",
             "tokenizer.token_type", "tokenizer.bos_token_id", "tokenizer.eos_token_id", "tokenizer.add_bos_token",
             "special_tokens", "chat_template", "custom", "gguf.llama.attention.head_count_kv",
             "tokenizer.padding_token_id"]
# Integers small, or outside [1, 2**31) (which AprFile rejects): huge in-range sizes (n_head or head_dim near
# 2**31) make weights.load_weights allocate (n_layer, q_dim) before it compares tensor shapes, for GGUF too.
INTS = st.integers(-3, 300) | st.sampled_from([-2**63, -1, 2**31, 2**32 + 1, 2**64, 2**70])
JSON = st.recursive(st.none() | st.booleans() | INTS | st.floats() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                    max_leaves=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(META_KEYS), JSON | INTS, min_size=1, max_size=3))
def test_fuzz_model_metadata_values(changes):
    """Config and tokenizer values of any JSON type: load works or raises a user error (AprError)."""
    from apr_numba.errors import AprError
    from apr_numba.model.decoder import load

    specs = [(gguf_to_apr_name(n), 0, list(a.shape), a) for n, a in tiny_tensors().items()]
    p = _TMP / "fuzz-meta.apr"
    try:
        af.write_apr(p, {**tiny_apr_metadata(), **changes}, specs)
    except ModelFormatError:
        return  # e.g. NaN is not JSON
    try:
        load(p, n_ctx=8, warmup=False)
    except AprError:
        pass


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    yield
    for p in _TMP.iterdir():
        p.unlink()
    _TMP.rmdir()
