"""``apr-numba serve`` as a subprocess on a free 127.0.0.1 port, driven by the real ``openai`` client.

Chat and completion text (streamed and not) must equal ``generate()`` with the same greedy settings; usage
counts must equal the tokenizer's counts; errors are OpenAI's (400 / 401 / 404 / 503). A bounded load test
(8 clients x 4 requests, half streaming, one disconnecting mid-stream) checks that every other request gets
the text it gets alone, none is lost or duplicated, the server stays up and its RSS stays flat. The server
shuts down cleanly on SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

from apr_numba.generation.generate import prompt_ids, run  # noqa: E402
from apr_numba.model.decoder import load  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SMOLLM = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
pytestmark = pytest.mark.skipif(not SMOLLM.is_file(), reason=f"needs {SMOLLM.name}")
N_CTX = 512
NAME = "smollm2-135m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class Server:
    """A ``python -m apr_numba serve`` subprocess."""

    def __init__(self, *args: str, model: str = str(SMOLLM), alias: str = NAME):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-m", "apr_numba", "serve", model, "--port", str(self.port),
                                      "--alias", alias, "-c", str(N_CTX), "--backend", "cpu", *args],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.proc.stdout.read()}")
            try:
                self.get("/health")
                return
            except OSError:
                time.sleep(0.5)
        self.proc.kill()
        raise AssertionError("server did not come up")

    def get(self, path: str, timeout: float = 5) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post_raw(self, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json",
                                                                          **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def client(self, key: str = "none"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture(scope="module")
def model():
    return load(SMOLLM, n_ctx=N_CTX)


@pytest.fixture(scope="module")
def server():
    s = Server("--parallel", "4", "--queue", "8")
    yield s
    assert s.stop() == 0, "the server did not exit cleanly on SIGTERM"


def greedy(model, prompt, n):
    """What generate() gives alone: text, prompt and completion token counts."""
    r = run(model, prompt, max_tokens=n, reuse_cache=False)
    return r.text, len(r.prompt_token_ids), len(r.token_ids), r.stop_reason


QUESTIONS = ["What is the capital of France?", "Name three colors.", "Say hello."]
PROMPTS = ["The capital of France is", "List the numbers from 1 to 100: 1, 2, 3,", "Once upon a time, there was a"]


def test_chat_completions_equal_generate(server, model):
    c = server.client()
    for q in QUESTIONS:
        msgs = [{"role": "user", "content": q}]
        text, n_prompt, n_gen, stop = greedy(model, msgs, 16)
        r = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=16, temperature=0)
        assert r.choices[0].message.content == text
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].finish_reason == ("length" if stop == "length" else "stop")
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, n_gen)
        assert r.usage.total_tokens == n_prompt + n_gen
        assert n_prompt == len(prompt_ids(model, msgs))
        chunks = list(c.chat.completions.create(model=NAME, messages=msgs, max_tokens=16, temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == n_gen and chunks[-1].usage.prompt_tokens == n_prompt
        assert len({ch.id for ch in chunks}) == 1


def test_completions_equal_generate(server, model):
    c = server.client()
    for p in PROMPTS:
        text, n_prompt, n_gen, _ = greedy(model, p, 12)
        r = c.completions.create(model=NAME, prompt=p, max_tokens=12, temperature=0)
        assert r.choices[0].text == text
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, n_gen)
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(
            model=NAME, prompt=p, max_tokens=12, temperature=0, stream=True))
        assert streamed == text


def test_models_and_health(server):
    ids = [m.id for m in server.client().models.list()]
    assert ids == [NAME]
    h = server.get("/health")
    assert h["status"] == "ok" and h["slots"] == 4


def test_errors(server):
    c = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert e.value.status_code == 404 and e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:  # a prompt longer than a slot's context
        c.completions.create(model=NAME, prompt="word " * (N_CTX + 10), max_tokens=2)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):  # out-of-range parameter
        c.completions.create(model=NAME, prompt="hi", max_tokens=-1)
    with pytest.raises(openai.BadRequestError):  # wrong type in the body
        c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                  extra_body={"top_p": "lots"})
    status, body = server.post_raw("/v1/chat/completions", b'{"model": "smollm2-135m", "messages": [')
    assert status == 400 and body["error"]["type"] == "invalid_request_error" and "JSON" in body["error"]["message"]
    status, body = server.post_raw("/v1/embeddings", json.dumps({"model": NAME, "input": "x"}).encode())
    assert status == 400 and "not an embedding model" in body["error"]["message"]
    assert server.get("/health")["status"] == "ok"


def test_load_8_clients_x_4_requests(server, model, capsys):
    """Half streaming, one disconnecting mid-stream; the rest equal their alone-greedy text."""
    n_tok = 8
    kinds = [("completion", p) for p in PROMPTS] + [("chat", q) for q in QUESTIONS]
    expect = {}
    for kind, p in kinds:
        expect[(kind, p)] = greedy(model, p if kind == "completion" else [{"role": "user", "content": p}], n_tok)[0]
    c = server.client()

    def one(kind, p, stream, disconnect=False):
        t0 = time.perf_counter()
        if kind == "completion":
            if stream:  # the disconnecting one asks for many tokens, so that it is still running when it leaves
                s = c.completions.create(model=NAME, prompt=p, max_tokens=200 if disconnect else n_tok,
                                         temperature=0, stream=True)
                parts, rid = [], None
                for i, ch in enumerate(s):
                    rid = ch.id
                    parts.append(ch.choices[0].text)
                    if disconnect and i == 1:
                        s.close()
                        return rid, None, time.perf_counter() - t0
                return rid, "".join(parts), time.perf_counter() - t0
            r = c.completions.create(model=NAME, prompt=p, max_tokens=n_tok, temperature=0)
            return r.id, r.choices[0].text, time.perf_counter() - t0
        msgs = [{"role": "user", "content": p}]
        if stream:
            s = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=n_tok, temperature=0, stream=True)
            parts, rid = [], None
            for ch in s:
                rid = ch.id
                parts.append(ch.choices[0].delta.content or "")
            return rid, "".join(parts), time.perf_counter() - t0
        r = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=n_tok, temperature=0)
        return r.id, r.choices[0].message.content, time.perf_counter() - t0

    def round_(n_clients, n_req, disconnect_client):
        results, errors = {}, []

        def client(ci):
            for j in range(n_req):
                kind, p = kinds[(ci + j) % len(kinds)]
                stream = (ci + j) % 2 == 0
                disc = ci == disconnect_client and j == 1
                if disc:
                    kind, p, stream = "completion", PROMPTS[1], True
                try:
                    results[(ci, j)] = (kind, p, disc, *one(kind, p, stream, disc))
                except Exception as exc:  # noqa: BLE001 - reported below
                    errors.append(f"client {ci} request {j}: {exc!r}")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        return results, errors, time.perf_counter() - t0

    pid = server.proc.pid
    round_(4, 1, -1)  # warm-up: every slot's KV pages touched
    before = rss_kb(pid)
    h0 = server.get("/health")
    results, errors, wall = round_(8, 4, disconnect_client=3)
    assert not errors, errors
    assert len(results) == 32  # none lost
    done = [r for r in results.values() if not r[2]]
    assert len(done) == 31
    assert len({r[3] for r in results.values()}) == 32  # none duplicated: 32 distinct response ids
    for kind, p, _, _, text, _ in done:
        assert text == expect[(kind, p)], (kind, p)
    time.sleep(1.0)
    h1 = server.get("/health")  # the server is up
    assert h1["completed"] - h0["completed"] == 31
    assert h1["cancelled"] - h0["cancelled"] == 1
    assert h1["active"] == 0 and h1["waiting"] == 0
    after = rss_kb(pid)
    assert after - before < 64 * 1024, f"RSS grew {before} -> {after} kB"
    lat = sorted(r[5] for r in done)
    p50, p99 = statistics.median(lat), lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    with capsys.disabled():
        print(f"\n[load] 31 requests x {n_tok} tokens in {wall:.2f}s: {31 * n_tok / wall:.1f} tok/s aggregate, "
              f"{31 / wall:.2f} req/s; latency p50 {p50:.2f}s p99 {p99:.2f}s; RSS {before // 1024} -> "
              f"{after // 1024} MB; prefill {h1['prefilled_tokens']} reused {h1['reused_tokens']} tokens")


def test_auth_and_queue_full():
    s = Server("--parallel", "1", "--queue", "1", "--api-key", "sekret")
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            s.client("wrong").models.list()
        assert e.value.status_code == 401
        c = s.client("sekret")
        assert [m.id for m in c.models.list()] == [NAME]
        outcomes, lock = [], threading.Lock()

        def req():
            try:
                c.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=48, temperature=0)
                out = "ok"
            except openai.APIStatusError as exc:
                out = exc.status_code
            with lock:
                outcomes.append(out)

        threads = [threading.Thread(target=req) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        # one slot + one queue place: the others are turned away with 503
        assert outcomes.count("ok") >= 2 and outcomes.count(503) >= 1 and len(outcomes) == 5, outcomes
        assert set(outcomes) <= {"ok", 503}
        assert s.get("/health")["status"] == "ok"
    finally:
        assert s.stop() == 0


def test_embeddings_server():
    from apr_numba.encoder.embedding import embed

    s = Server(model="minilm-l6", alias="minilm-l6")
    try:
        c = s.client()
        texts = ["a sentence", "another one"]
        r = c.embeddings.create(model="minilm-l6", input=texts)
        ref = embed("minilm-l6", texts)
        import numpy as np

        got = np.array([d.embedding for d in r.data], np.float32)
        np.testing.assert_allclose(got, ref, atol=1e-6)  # the server's BLAS runs 1 thread: summation order
        r2 = c.embeddings.create(model="minilm-l6", input=texts, encoding_format="float")
        np.testing.assert_allclose(np.array([d.embedding for d in r2.data]), ref, atol=1e-6)
        assert r.usage.prompt_tokens > 0
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model="minilm-l6", messages=[{"role": "user", "content": "hi"}])
    finally:
        assert s.stop() == 0
