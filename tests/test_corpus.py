"""Corpus jobs (apr_numba.jobs): embed_corpus / generate_batch locally, on a local Ray cluster, killed and
resumed, and their CLI. References: apr_numba.embed / apr_numba.generate on the same texts, one call each
(the paths those jobs must reproduce bit for bit / token for token)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from threadpoolctl import threadpool_limits

import apr_numba
from apr_numba.cli.main import main
from apr_numba.errors import ArgumentError
from apr_numba.jobs.shards import plan_shards, read_shard

ROOT = Path(__file__).resolve().parents[1]
N_DOCS = 2000
MAX_TOKENS = 4  # greedy tokens per batch prompt (keeps the 50-prompt runs short on 2 shared cores)
WORDS = ["cat", "dog", "bird", "river", "stone", "cloud", "engine", "violin"]


def corpus_texts(n: int = N_DOCS) -> list[str]:
    """Short documents of varied lengths (1-6 words + a number), some with non-ASCII text."""
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + i % 6)) + f" {i}" + (" é" if i % 11 == 0
                                                                                             else "")
            for i in range(n)]


@pytest.fixture(scope="module")
def encoder():
    return apr_numba.load_encoder("minilm-l6")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, encoder):
    """(jsonl path, ids, texts, reference vectors from apr_numba.embed)."""
    d = tmp_path_factory.mktemp("corpus")
    texts = corpus_texts()
    ids = [f"doc-{i:05d}" for i in range(N_DOCS)]
    path = d / "docs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, t in zip(ids, texts, strict=True):
            f.write(json.dumps({"id": i, "text": t, "extra": 1}) + "\n")
            if i.endswith("7"):
                f.write("\n")  # blank lines are not records
    with threadpool_limits(limits=1, user_api="blas"):  # the jobs' BLAS setting (see single_threaded_blas)
        ref = apr_numba.embed(encoder, texts)
    return path, ids, texts, ref


def read_vectors(path: Path) -> tuple[list, np.ndarray]:
    t = pq.read_table(path)
    assert t.column_names == ["id", "vector"]
    assert t.schema.field("vector").type == pa.list_(pa.float32(), 384)
    vec = t.column("vector").combine_chunks().values.to_numpy().reshape(-1, 384)
    return t.column("id").to_pylist(), vec


@pytest.fixture(scope="module")
def local_out(corpus, encoder, tmp_path_factory):
    path, ids, texts, ref = corpus
    out = tmp_path_factory.mktemp("local") / "vectors.parquet"
    stats = apr_numba.embed_corpus(encoder, path, out, shard_size=250)
    assert stats["rows"] == N_DOCS and stats["computed_rows"] == N_DOCS and stats["skipped_rows"] == 0
    assert not Path(str(out) + ".parts").exists()
    return out


def test_local_embed_equals_embed(corpus, local_out):
    _, ids, _, ref = corpus
    got_ids, vec = read_vectors(local_out)
    assert got_ids == ids  # same order, nothing lost or duplicated
    assert vec.dtype == np.float32 and np.array_equal(vec, ref)


def test_plain_text_and_parquet_inputs(tmp_path, encoder, corpus):
    _, _, texts, ref = corpus
    sub = texts[:95]
    txt = tmp_path / "docs.txt"
    txt.write_text("".join(t + "\n" for t in sub), encoding="utf-8")
    apr_numba.embed_corpus(encoder, txt, tmp_path / "v.npy", shard_size=20)
    assert np.array_equal(np.load(tmp_path / "v.npy"), ref[:95])
    assert [json.loads(x) for x in (tmp_path / "v.ids.jsonl").read_text().splitlines()] == list(range(95))
    # Parquet with row groups (7 rows) that do not line up with the shards (20 rows)
    pqf = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": sub, "n": list(range(95))}), pqf, row_group_size=7)
    apr_numba.embed_corpus(encoder, pqf, tmp_path / "p.parquet", text_column="body", shard_size=20)
    got_ids, vec = read_vectors(tmp_path / "p.parquet")
    assert got_ids == list(range(95)) and np.array_equal(vec, ref[:95])


def test_shard_plan_covers_every_record_once(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text("".join(json.dumps({"text": str(i)}) + ("\n\n" if i % 3 == 0 else "\n") for i in range(53)))
    shards = plan_shards(p, 10)
    rows = [r for s in shards for r in read_shard(p, s)]
    assert [r["text"] for r in rows] == [str(i) for i in range(53)]
    assert [r["_row"] for r in rows] == list(range(53))


def _job_in_fresh_process(path, out, **kw) -> dict:
    """``embed_corpus`` in a new Python process, as a Ray actor or a restarted job runs it; returns its stats."""
    args = ", ".join(f"{k}={v!r}" for k, v in {"shard_size": 100, "threads": 1, "progress": False, **kw}.items())
    code = (f"import json, apr_numba; s = apr_numba.embed_corpus('minilm-l6', {str(path)!r}, {str(out)!r}, {args}); "
            f"print(json.dumps({{k: v for k, v in s.items() if isinstance(v, (int, str))}}))")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fresh_ref(corpus, tmp_path_factory):
    """The uninterrupted job's vectors, computed in a fresh process: the reference for what other fresh
    processes (a restarted job, Ray actors) write. (In the long-lived test process, state left by earlier tests
    can change the last float32 bits; tests of that process compare against ``corpus``'s in-process reference.)"""
    out = tmp_path_factory.mktemp("fresh") / "vectors.parquet"
    _job_in_fresh_process(corpus[0], out)
    got_ids, vec = read_vectors(out)
    assert got_ids == corpus[1]
    np.testing.assert_allclose(vec, corpus[3], rtol=0, atol=1e-6)  # the in-process embed, up to float32 noise
    return vec


def test_killed_job_resumes_to_same_output(corpus, fresh_ref, tmp_path):
    path, ids, _, _ = corpus
    ref = fresh_ref
    out = tmp_path / "vectors.parquet"
    parts = Path(str(out) + ".parts")
    code = (f"import apr_numba; apr_numba.embed_corpus('minilm-l6', {str(path)!r}, {str(out)!r}, shard_size=100, "
            f"threads=1, progress=False)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while len(list(parts.glob("part-*.parquet"))) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "no parts written"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    n_done = len(list(parts.glob("part-*.parquet")))
    assert 3 <= n_done < 20 and not out.exists()
    stats = _job_in_fresh_process(path, out)  # the restart: skips the finished shards
    assert stats["skipped_rows"] == 100 * n_done and stats["computed_rows"] == N_DOCS - 100 * n_done
    assert out.exists() and not parts.exists()  # the parts were merged and removed
    got_ids, vec = read_vectors(out)
    assert got_ids == ids and np.array_equal(vec, ref)


def test_resume_refuses_other_options(tmp_path, encoder):
    path = tmp_path / "d.txt"
    path.write_text("one\ntwo\n")
    out = tmp_path / "v.parquet"
    parts = Path(str(out) + ".parts")
    parts.mkdir()
    (parts / "manifest.json").write_text(json.dumps({"version": 1, "config": {"job": "embed", "pooling": "cls"}}))
    with pytest.raises(ArgumentError, match="parts of another job"):
        apr_numba.embed_corpus(encoder, path, out)
    apr_numba.embed_corpus(encoder, path, out, overwrite=True)
    with pytest.raises(ArgumentError, match="output exists"):
        apr_numba.embed_corpus(encoder, path, out)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024 ** 2, log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()


def test_ray_embed_equals_local(corpus, fresh_ref, ray_cluster, tmp_path):
    _, ids, _, _ = corpus
    ref = fresh_ref
    out = tmp_path / "vectors.parquet"
    stats = apr_numba.embed_corpus("minilm-l6", corpus[0], out, backend="ray", workers=2, shard_size=250)
    assert stats["backend"] == "ray" and stats["computed_rows"] == N_DOCS
    got_ids, vec = read_vectors(out)
    assert got_ids == ids and np.array_equal(vec, ref)
    assert ray_cluster.is_initialized()  # a cluster the caller started is left running


def prompts() -> list[dict]:
    rows = [{"prompt": f"The {WORDS[i % 8]} number {i} is", "id": f"p-{i}"} for i in range(45)]
    rows += [{"messages": [{"role": "user", "content": f"Name a {WORDS[i]}."}], "id": f"chat-{i}"} for i in range(4)]
    rows += [{"prompt": "1, 2, 3, 4,", "stop": [" 6"], "max_tokens": 12, "id": "count"}]
    return rows


@pytest.fixture(scope="module")
def batch_local(tmp_path_factory):
    d = tmp_path_factory.mktemp("batch")
    src = d / "prompts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in prompts()))
    out = d / "out.jsonl"
    apr_numba.generate_batch("smollm2-135m", src, out, max_tokens=MAX_TOKENS, shard_size=10, n_ctx=256)
    return src, [json.loads(x) for x in out.read_text().splitlines()]


def test_batch_local_equals_generate(batch_local):
    _, res = batch_local
    rows = prompts()
    assert len(res) == 50 and [r["id"] for r in res[45:49]] == [f"chat-{i}" for i in range(4)]
    assert [r["id"] for r in res[:45]] == [f"p-{i}" for i in range(45)]
    model = apr_numba.load("smollm2-135m", backend="cpu", n_ctx=256)
    finish = {"eos": "stop", "stop": "stop", "length": "length"}
    for i, kw in ((0, {}), (44, {}), (49, {"max_tokens": 12, "stop": [" 6"]})):
        ref = apr_numba.run(model, rows[i]["prompt"], **dict({"max_tokens": MAX_TOKENS}, **kw))
        assert res[i]["token_ids"] == ref.token_ids and res[i]["text"] == ref.text
        assert res[i]["finish_reason"] == finish[ref.stop_reason]
        assert res[i]["prompt_tokens"] == len(ref.prompt_token_ids)
        assert res[i]["completion_tokens"] == len(ref.token_ids)
    assert res[49]["finish_reason"] == "stop" and " 6" not in res[49]["text"]


def test_batch_ray_equals_local(batch_local, ray_cluster, tmp_path):
    src, res = batch_local
    out = tmp_path / "out.parquet"
    apr_numba.generate_batch("smollm2-135m", src, out, max_tokens=MAX_TOKENS, shard_size=10, n_ctx=256, backend="ray",
                             workers=2)
    got = pq.read_table(out).to_pylist()
    assert [g["id"] for g in got] == [r["id"] for r in res]
    assert [g["token_ids"] for g in got] == [r["token_ids"] for r in res]
    assert [(g["text"], g["finish_reason"], g["prompt_tokens"]) for g in got] == \
        [(r["text"], r["finish_reason"], r["prompt_tokens"]) for r in res]


def test_cli_embed_and_errors(tmp_path, capsys, corpus):
    txt = tmp_path / "d.txt"
    txt.write_text("a cat\nthe dog sat\n")
    assert main(["embed", "minilm-l6", "--input", str(txt), "--output", str(tmp_path / "o.npy")]) == 0
    with threadpool_limits(limits=1, user_api="blas"):
        ref = apr_numba.embed("minilm-l6", ["a cat", "the dog sat"])
    assert np.array_equal(np.load(tmp_path / "o.npy"), ref)
    assert "2 docs" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 3}\n')
    assert main(["embed", "minilm-l6", "--input", str(bad), "--output", str(tmp_path / "b.parquet")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"apr-numba: error: {bad}: line 2: field 'text' is int, not a string (the text; see --text-column)"]
    assert main(["batch", "smollm2-135m", "--input", str(bad), "--output", str(tmp_path / "b.jsonl")]) == 2
    assert "line 1: no 'prompt'" in capsys.readouterr().err


def test_cli_ray_missing_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    txt = tmp_path / "d.txt"
    txt.write_text("a cat\n")
    rc = main(["embed", "minilm-l6", "--input", str(txt), "--output", str(tmp_path / "o.npy"), "--ray"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["apr-numba: error: the Ray backend needs Ray Data: pip install 'apr-numba[ray]'"]
