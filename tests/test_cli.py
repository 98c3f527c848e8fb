"""The ``apr-numba`` command line, run for real as ``python -m apr_numba`` subprocesses.

Successful runs use SmolLM2-135M with a few tokens; bad input (missing, non-GGUF, truncated, unknown
architecture, unsupported quantization, bad arguments) must exit with code 2 and print exactly one line
``apr-numba: error: ...`` naming the file or argument, with no traceback unless ``--verbose``.
Fake model files are written to tmp folders, and ``APR_NUMBA_CACHE`` points into a tmp folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType, GGUFReader

from apr_numba.generation.generate import generate
from apr_numba.model.decoder import load
from tests.tiny_gguf import write_tiny_gguf

ROOT = Path(__file__).resolve().parent.parent
SMOLLM = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL = "smollm2-135m"
PROMPT = "The capital of France is"
pytestmark = pytest.mark.skipif(not SMOLLM.is_file(), reason=f"needs {SMOLLM.name}")


# -- helpers -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    e = dict(os.environ)
    e["APR_NUMBA_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    e.pop("APR_NUMBA_MODELS", None)
    return e


def cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apr_numba", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    out = {"missing": d / "missing.gguf", "text": d / "notes.gguf", "trunc_1mb": d / "trunc_1mb.gguf",
           "trunc_data": d / "trunc_data.gguf", "arch": d / "mamba9.gguf", "quant": d / "iq4nl.gguf"}
    out["text"].write_text("this is a text file, not a model\n")
    data_start = GGUFReader(SMOLLM).data_offset
    size = SMOLLM.stat().st_size
    with open(SMOLLM, "rb") as fh:
        head = fh.read(data_start + (size - data_start) // 2)
    out["trunc_1mb"].write_bytes(head[: 1 << 20])
    assert (1 << 20) < data_start  # the 1 MiB cut is inside the metadata
    out["trunc_data"].write_bytes(head)  # cut in the middle of the tensor data
    write_tiny_gguf(out["arch"], arch="mamba9")
    write_tiny_gguf(out["quant"], q_type=GGMLQuantizationType.Q8_1)
    return out


@pytest.fixture(scope="module")
def model():
    return load(MODEL)


@pytest.fixture(scope="module")
def greedy_text(model) -> str:
    return generate(model, PROMPT, max_tokens=8)


@pytest.fixture(scope="module")
def json_run(env) -> dict:
    r = cli(env, "run", MODEL, "-p", PROMPT, "-n", "8", "--json")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout  # one JSON object, nothing else on stdout
    return json.loads(lines[0])


# -- run -----------------------------------------------------------------------------------

def test_run_json(json_run, model, greedy_text):
    out = json_run
    for key in ("text", "prompt_token_ids", "token_ids", "prefill_tok_s", "decode_tok_s", "threads",
                "threading_layer", "stop_reason"):
        assert key in out, key
    assert out["prompt_token_ids"] == model.encode(PROMPT)
    assert 0 < len(out["token_ids"]) <= 8
    assert all(isinstance(i, int) and 0 <= i < model.config.n_vocab for i in out["token_ids"])
    assert out["text"] == model.decode(out["token_ids"])
    assert out["text"] == greedy_text
    assert isinstance(out["threads"], int) and out["threads"] >= 1
    assert out["threading_layer"] in ("tbb", "omp", "workqueue")
    assert out["prefill_tok_s"] > 0 and out["decode_tok_s"] >= 0
    assert out["stop_reason"] in ("length", "eos")
    assert Path(out["model"]).resolve() == SMOLLM.resolve()


def test_run_plain_equals_python_api(env, greedy_text):
    r = cli(env, "run", MODEL, "-p", PROMPT, "-n", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout == greedy_text + "\n"
    assert "[apr-numba]" in r.stderr and "tok/s" in r.stderr  # timings go to stderr, not stdout
    assert "Traceback" not in r.stderr


def test_run_stream_prints_same_text(env, greedy_text):
    # positional prompt this time
    r = cli(env, "run", MODEL, PROMPT, "-n", "8", "--stream")
    assert r.returncode == 0, r.stderr
    assert r.stdout == greedy_text + "\n"


def test_run_chat_applies_template(env, model):
    r = cli(env, "run", MODEL, "-p", "What is the capital of France?", "-n", "8", "--chat", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    im_start = model.encode("<|im_start|>")
    assert len(im_start) == 1
    assert out["prompt_token_ids"][0] == im_start[0]
    assert out["prompt_token_ids"] != model.encode("What is the capital of France?")
    assert generate(model, "What is the capital of France?", max_tokens=8, chat=True) == out["text"]
    assert "<|im_end|>" not in out["text"]


# -- errors ------------------------------------------------------------------------------------

def assert_one_line_error(r: subprocess.CompletedProcess, *names: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("apr-numba: error: "), lines[0]
    for n in names:
        assert n in lines[0], (n, lines[0])
    assert r.stdout == ""
    return lines[0]


@pytest.mark.parametrize("which", ["missing", "text", "trunc_1mb", "trunc_data", "arch", "quant"])
def test_bad_model_file(env, bad_files, which):
    path = bad_files[which]
    r = cli(env, "run", str(path), "-p", "hello", "-n", "2")
    line = assert_one_line_error(r, str(path))
    extra = {"arch": "mamba9", "quant": "Q8_1"}.get(which)
    if extra:
        assert extra in line
    if which == "quant":
        assert "blk.0.attn_q.weight" in line


@pytest.mark.parametrize("args, names", [
    (["-p", "hello", "--max-tokens", "-1"], ["max_tokens", "-1"]),
    (["-p", "hello", "--top-p", "0"], ["top_p"]),
    (["-p", "hello", "--temperature", "-1"], ["temperature"]),
    (["--n-ctx", "16", "-p", "the quick brown fox jumps over the lazy dog " * 4],
     ["prompt", "16"]),
], ids=["max_tokens", "top_p", "temperature", "prompt_too_long"])
def test_bad_arguments(env, args, names):
    assert_one_line_error(cli(env, "run", MODEL, *args), *names)


def test_no_prompt(env):
    assert_one_line_error(cli(env, "run", MODEL), "prompt")


@pytest.mark.parametrize("cmd", ["run", "inspect"])
def test_unknown_registry_name(env, cmd):
    extra = ["-p", "hello"] if cmd == "run" else []
    assert_one_line_error(cli(env, cmd, "no-such-model-xyz", *extra), "no-such-model-xyz")


def test_verbose_shows_traceback(env, bad_files):
    path = bad_files["text"]
    r = cli(env, "run", str(path), "-p", "hello", "--verbose")
    assert r.returncode == 2
    assert "Traceback (most recent call last)" in r.stderr
    assert "ModelFormatError" in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("apr-numba: error: ") and str(path) in last


# -- inspect -------------------------------------------------------------------------------------

def test_inspect_json_matches_gguf_reader(env):
    r = cli(env, "inspect", MODEL, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    reader = GGUFReader(SMOLLM)

    def field(key):
        return reader.fields[key].contents()

    arch = field("general.architecture")
    assert arch == "llama"
    assert info["architecture"] == arch
    assert info["format"] == "GGUF"
    assert info["file_bytes"] == SMOLLM.stat().st_size
    cfg = info["config"]
    assert "error" not in cfg, cfg
    assert cfg["n_layer"] == field(f"{arch}.block_count")
    assert cfg["n_embd"] == field(f"{arch}.embedding_length")
    assert cfg["n_head"] == field(f"{arch}.attention.head_count")
    assert cfg["n_ff"] == field(f"{arch}.feed_forward_length")
    assert cfg["n_vocab"] == len(field("tokenizer.ggml.tokens"))
    assert info["tokenizer"]["vocab_size"] == len(field("tokenizer.ggml.tokens"))
    assert info["tokenizer"]["bos_token_id"] == field("tokenizer.ggml.bos_token_id")
    assert info["tokenizer"]["eos_token_id"] == field("tokenizer.ggml.eos_token_id")

    assert len(info["tensors"]) == len(reader.tensors)
    by_name = {t["name"]: t for t in info["tensors"]}
    for t in reader.tensors:
        got = by_name[t.name]
        assert got["dtype"] == t.tensor_type.name
        assert got["shape"] == [int(x) for x in reversed(t.shape)]
        assert got["bytes"] == int(t.n_bytes) and got["offset"] == int(t.data_offset)
    counts = Counter(t.tensor_type.name for t in reader.tensors)
    nbytes = Counter()
    for t in reader.tensors:
        nbytes[t.tensor_type.name] += int(t.n_bytes)
    assert {k: v["count"] for k, v in info["quant_mix"].items()} == dict(counts)
    assert {k: v["bytes"] for k, v in info["quant_mix"].items()} == dict(nbytes)
    assert info["tensor_bytes"] == sum(nbytes.values())


def test_closed_stdout_is_not_a_traceback(env):
    """`apr-numba run ... | head -c 1`: stdout closed before the text is written -> a quiet exit."""
    p = subprocess.Popen([sys.executable, "-m", "apr_numba", "run", MODEL, "-p", PROMPT, "-n", "4", "--stream"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    p.stdout.close()  # long before the model is loaded
    _, err = p.communicate(timeout=300)
    err = err.decode()
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert p.returncode != 0
