"""Hypothesis fuzzers of every reader, run by tests/test_fuzz_readers.py in a subprocess with an
address-space cap (``RLIMIT_AS``). Each ``fuzz_*`` returns the number of cases it ran.

* gguf: integer fields of the header, every KV (key length, type, value / array count) and every tensor
  info (name length, n_dims, dims, type, offset) of a tiny decoder GGUF set to boundary values, plus byte
  flips and truncations; the file is opened and loaded (``apr_numba.load``, no warm-up).
* safetensors: header entries and config.json values of any JSON type.
* templates: chat templates assembled from hostile fragments (big ranges, nested loops, string growth,
  format widths, division by zero, recursion), rendered with a 0.2 s budget.
* cli: ``apr-numba run / inspect`` on corrupt files with random flag values, in-process (``main(argv)``).

Every case must end in success or an :class:`~apr_numba.errors.AprError`; anything else fails the run.
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apr_numba.errors import AprError

_TMP = Path(tempfile.mkdtemp(prefix="apr-fuzz-readers-"))
SETTINGS = dict(derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
BOUNDARY = [0, 1, 2, 3, 7, 8, 31, 32, 33, 255, 4096, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 40, (1 << 63) - 1,
            1 << 63, (1 << 64) - 1]


def _tiny() -> bytes:
    from tests.tiny_gguf import write_tiny_gguf

    p = _TMP / "base.gguf"
    if not p.is_file():
        write_tiny_gguf(p)
    return p.read_bytes()


def _int_fields(path: Path) -> list[tuple[int, int]]:
    """(position, width) of every integer part (u32 / u64) of the header, KVs and tensor infos (gguf-py's view)."""
    from gguf import GGUFReader

    r = GGUFReader(path, "r")
    out = [(4, 4), (8, 8), (16, 8)]
    for f in list(r.fields.values()) + [t.field for t in r.tensors]:
        pos = f.offset
        for part in f.parts:
            n = int(part.nbytes)
            if n in (4, 8) and part.dtype.kind == "u" and part.size == 1:
                out.append((pos, n))
            pos += n
    return out


def fuzz_gguf(n: int) -> int:
    import apr_numba
    from apr_numba.formats.gguf_file import GGUFFile

    base = _tiny()
    fields = _int_fields(_TMP / "base.gguf")
    count = [0]

    @settings(max_examples=n, **SETTINGS)
    @given(st.data())
    def case(data):
        b = bytearray(base)
        kind = data.draw(st.sampled_from(["field", "field", "flip", "truncate"]))
        if kind == "field":
            for _ in range(data.draw(st.integers(1, 3))):
                pos, w = data.draw(st.sampled_from(fields))
                v = data.draw(st.sampled_from(BOUNDARY) | st.integers(0, (1 << (8 * w)) - 1))
                struct.pack_into("<I" if w == 4 else "<Q", b, pos, v % (1 << (8 * w)))
        elif kind == "flip":
            for _ in range(data.draw(st.integers(1, 8))):
                i = data.draw(st.integers(0, 20000))
                b[i] ^= data.draw(st.integers(1, 255))
        else:
            del b[data.draw(st.integers(0, len(b) - 1)):]
        p = _TMP / "case.gguf"
        p.write_bytes(b)
        count[0] += 1
        try:
            f = GGUFFile(p, use_cache=False)
            for t in f.tensors.values():
                assert 0 <= t.offset and t.offset + t.nbytes <= len(b), t
            apr_numba.load(str(p), backend="cpu", warmup=False, n_ctx=8)
        except AprError as exc:
            assert str(p) in str(exc) or "n_ctx" in str(exc), exc

    case()
    return count[0]


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(max_size=8),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                     max_leaves=8)
_CONFIG = {"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
           "intermediate_size": 16, "vocab_size": 10, "max_position_embeddings": 8}


def fuzz_safetensors(n: int) -> int:
    from apr_numba.encoder.weights import EncoderConfig, source_config
    from apr_numba.formats.safetensors_dir import SafetensorsDir

    count = [0]

    @settings(max_examples=n, **SETTINGS)
    @given(st.data())
    def case(data):
        d = Path(tempfile.mkdtemp(dir=_TMP))
        entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
        cfg = dict(_CONFIG)
        where = data.draw(st.sampled_from(["entry", "config", "header"]))
        if where == "entry":
            entry[data.draw(st.sampled_from(sorted(entry)))] = data.draw(_JSON)
        elif where == "config":
            cfg[data.draw(st.sampled_from(sorted(cfg)))] = data.draw(_JSON)
        header = json.dumps({"w": entry} if where != "header" else data.draw(_JSON)).encode()
        (d / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
        (d / "config.json").write_text(json.dumps(cfg))
        count[0] += 1
        try:
            src = SafetensorsDir(d)
            EncoderConfig.from_hf(source_config(src), str(d))
        except AprError as exc:
            assert str(d) in str(exc), exc

    case()
    return count[0]


_FRAGMENTS = ["{{ range(@)|list|length }}", "{% for i in range(@) %}{% for j in range(@) %}{% endfor %}{% endfor %}",
              "{{ 'x' * @ }}", "{{ [1] * @ }}", "{{ @ // 0 }}", "{{ @ ** @ }}", "{{ 'a'|center(@) }}",
              "{{ '%0@d' % 1 }}", "{{ '{:>@}'.format(1) }}", "{{ ('ab' * 1000).replace('a', 'b' * @) }}",
              "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "{{ messages[@] }}", "{{ x.y.z }}",
              "{% for m in messages %}{{ m['content'] * @ }}{% endfor %}", "{{ raise_exception('no') }}",
              "{{ (messages|tojson(indent=@))|length }}", "{{ 'a'|indent(@) }}", "hello {{ bos_token }}"]


def _fill(fragment: str, a: str, b: str) -> str:
    return fragment.replace("@", a, 1).replace("@", b, 1)


def fuzz_templates(n: int) -> int:
    from apr_numba.model import chat_template as ct

    ct.RENDER_SECONDS = 0.2
    count = [0]
    nums = st.sampled_from(["0", "1", "-1", "100000", "10**9", "10**11", "2**64", "99999999999"])

    @settings(max_examples=n, **SETTINGS)
    @given(st.lists(st.tuples(st.sampled_from(_FRAGMENTS), nums, nums), min_size=1, max_size=3))
    def case(parts):
        src = "".join(_fill(f, a, b) for f, a, b in parts)
        count[0] += 1
        t0 = time.monotonic()
        try:
            t = ct.compile_chat_template(src, "fuzz.gguf")
            out = ct.render_chat_template(t, [{"role": "user", "content": "hi"}], True, {"bos_token": "<s>"},
                                          "fuzz.gguf")
            assert len(out) <= ct.MAX_OUTPUT + 100
        except AprError as exc:
            assert "fuzz.gguf" in str(exc), exc
        assert time.monotonic() - t0 < 3.0, src

    case()
    return count[0]


def _bad_models() -> list[str]:
    from tests.bad_gguf import V, layout, rewrite_kv, set_offset

    base = _TMP / "base.gguf"
    _tiny()
    out = [str(rewrite_kv(base, _TMP / "m_heads.gguf", {"llama.attention.head_count_kv": (3, V.UINT32)})),
           str(rewrite_kv(base, _TMP / "m_type.gguf", {"llama.block_count": ("1", V.STRING)})),
           str(rewrite_kv(base, _TMP / "m_ctx.gguf", {"llama.context_length": ((1 << 31) - 1, V.UINT32),
                                                      "llama.rope.dimension_count": (16, V.UINT32)})),
           str(set_offset(base, _TMP / "m_off.gguf", "output_norm.weight",
                          layout(str(base))["offsets"]["output_norm.weight"] + 4)),
           str(_TMP / "missing.gguf"), str(_TMP)]
    fifo = _TMP / "fifo.gguf"
    if not fifo.exists():
        os.mkfifo(fifo)
    return out + [str(fifo)]


def fuzz_cli(n: int) -> int:
    from apr_numba.cli.main import main

    models = _bad_models()
    count = [0]
    val = st.sampled_from(["0", "-1", "1", "nan", "inf", "1e309", "abc", "\udcff\udcfe", "1000000000", ""])
    flags = st.lists(st.tuples(st.sampled_from(["-n", "--n-ctx", "--temperature", "--top-p", "--top-k", "-t",
                                                "--seed", "--stop", "--repeat-penalty", "--device"]), val), max_size=3)

    @settings(max_examples=n, **SETTINGS)
    @given(st.sampled_from(["run", "inspect"]), st.sampled_from(models), val, flags, st.booleans())
    def case(cmd, model, prompt, fl, chat):
        argv = [cmd, model]
        if cmd == "run":
            argv += ["-p", prompt, "--cpu"] + (["--chat"] if chat else [])
            for k, v in fl:
                argv += [k, v]
        out, err = io.StringIO(), io.StringIO()
        count[0] += 1
        with redirect_stdout(out), redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as e:  # argparse: bad flag value
                rc = e.code
        if cmd == "inspect" and rc == 0:  # inspect lists a file whose config is bad, with the error in place
            assert "error" in out.getvalue().lower() and "Traceback" not in err.getvalue(), argv
            return
        assert rc == 2, (argv, rc, out.getvalue()[-300:], err.getvalue()[-300:])
        assert out.getvalue() == "" and "Traceback" not in err.getvalue(), (argv, err.getvalue()[-500:])

    case()
    return count[0]


def _peak_rss_mib() -> int:
    """This process's peak RSS (VmHWM; ``ru_maxrss`` would include the forking pytest parent's, as it survives exec)."""
    with open("/proc/self/status") as fh:
        return next(int(ln.split()[1]) for ln in fh if ln.startswith("VmHWM")) // 1024


if __name__ == "__main__":
    import resource

    which, n, cap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    t0 = time.perf_counter()
    cases = globals()[f"fuzz_{which}"](n)
    print(json.dumps({"reader": which, "cases": cases, "seconds": round(time.perf_counter() - t0, 2),
                      "rss_mib": _peak_rss_mib()}))
