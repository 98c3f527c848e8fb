"""``apr-numba chat`` under a pty (pexpect): two turns where the second builds on the first, with the second
turn prefilling only its new tokens (the KV cache of turn one reused); Ctrl-C stops an answer, not the
REPL; /save writes the conversation; /exit leaves with status 0."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

from apr_numba.generation.generate import prompt_ids, run  # noqa: E402
from apr_numba.model.decoder import load  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SMOLLM = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
pytestmark = pytest.mark.skipif(not SMOLLM.is_file(), reason=f"needs {SMOLLM.name}")
STATS = re.compile(r"\[prefill (\d+) tokens \(reused (\d+) cached\), (\d+) generated")
N = 16


def lcp(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_chat_repl_two_turns_reuse_the_cache(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "dumb"}
    child = pexpect.spawn(sys.executable, ["-m", "apr_numba", "chat", str(SMOLLM), "-n", str(N), "-c", "512",
                                           "--backend", "cpu", "--verbose"],
                          cwd=str(ROOT), env=env, encoding="utf-8", timeout=300, dimensions=(50, 400))
    turns = ["My name is Alice and I like green apples.", "What is my name?"]
    seen = []
    try:
        child.expect(">>> ")
        for t in turns:
            child.sendline(t)
            child.expect(STATS)
            out = child.before.replace("\r\n", "\n")
            seen.append((out, [int(x) for x in child.match.groups()]))
            child.expect(">>> ")
        save = tmp_path / "conv.json"
        child.sendline(f"/save {save}")
        child.expect(">>> ")
        # Ctrl-C during an answer stops it and the REPL goes on
        child.sendline("Tell me a very long story about a dragon.")
        time.sleep(0.5)
        child.sendintr()
        child.expect(STATS)
        child.expect(">>> ")
        child.sendline("/stats")
        child.expect(STATS)
        child.expect(">>> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0

    # the independent account: the template's token ids and the greedy answers generated from scratch
    model = load(SMOLLM, n_ctx=512)
    m1 = [{"role": "user", "content": turns[0]}]
    r1 = run(model, m1, max_tokens=N, reuse_cache=False)
    m2 = m1 + [{"role": "assistant", "content": r1.text}, {"role": "user", "content": turns[1]}]
    r2 = run(model, m2, max_tokens=N, reuse_cache=False)
    ids1, ids2 = prompt_ids(model, m1), prompt_ids(model, m2)
    (out1, (pf1, re1, g1)), (out2, (pf2, re2, g2)) = seen
    assert r1.text.strip() in out1 and r2.text.strip() in out2  # turn two answered with turn one in its prompt
    assert (pf1, re1, g1) == (len(ids1), 0, len(r1.token_ids))
    evaluated = r1.token_ids if r1.stop_reason == "eos" else r1.token_ids[:-1]  # the last sampled token is not
    expect_reused = lcp(ids1 + evaluated, ids2)
    assert expect_reused >= len(ids1) + len(evaluated) - 1  # the whole first turn is a prefix of the second
    assert (pf2, re2) == (len(ids2) - expect_reused, expect_reused)
    assert pf2 < len(ids2) - len(ids1)  # only the new turn (and the tail of the answer) is prefilled
    saved = json.loads(save.read_text())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant", "user", "assistant"]
    assert saved["messages"][3]["content"] == r2.text
