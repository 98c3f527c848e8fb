"""A replaying engine: plays back a session saved by the dashboard (``s``), so layout tests, snapshots and
screenshots show measured numbers without running a model.

Every number it emits comes from the recording: token times, per-layer cosines (emitted when the recorded
backend had reached the same position: position + 1 + lag), the result, gates and the L1 reading. Nothing
is synthesized; what the recording lacks (gates, bisect) is reported as absent.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from tui.chat import Conversation
from tui.engine import SESSION_SCHEMA
from tui.events import (
    Bisected,
    Done,
    GateRow,
    L1Reading,
    Loaded,
    ModelInfo,
    Parity,
    ShadowProgress,
    Status,
    Token,
    gates_summary,
)


class FakeEngine:
    """Replays the last generation of a session file for any prompt.

    Args:
        session: path of an apr-tui-session-v1 JSON file.
        pause_at: stop after this many tokens and wait (as a generation still running) until cancelled.
        speed: 0 = emit as fast as possible; s > 0 = sleep the recorded gaps divided by s.
    """

    replay = True

    def __init__(self, session, pause_at: int | None = None, speed: float = 0.0):
        self.path = Path(session)
        self.data = json.loads(self.path.read_text())
        if self.data.get("schema") != SESSION_SCHEMA:
            raise ValueError(f"{self.path}: not an {SESSION_SCHEMA} file (schema {self.data.get('schema')!r})")
        gens = [g for g in self.data.get("generations", []) if g.get("tokens")]
        if not gens:
            raise ValueError(f"{self.path}: the session holds no generation to replay")
        self.rec = gens[-1]
        self.pause_at, self.speed = pause_at, speed
        self.info = ModelInfo(**self.data["model"])
        sh = self.data.get("shadow") or {}
        self.shadow_kind, self.shadow_label = sh.get("kind", "off"), sh.get("label", "")
        self.paused = threading.Event()
        self.conversation = Conversation()
        self.history: list[dict] = []

    def load(self, emit) -> Loaded:
        ev = Loaded(self.info, self.shadow_kind, self.shadow_label)
        emit(ev)
        emit(L1Reading(**self.data["l1"]) if self.data.get("l1") else
             L1Reading(None, "", "no L1 reading in the recorded session"))
        return ev

    def shadow_loop(self, emit, cancelled) -> None:
        return None  # the recorded cosines come with the tokens

    def gates_note(self) -> str | None:
        return None if self.data.get("gates") else self.data.get("gates_note") or "no gates in the recorded session"

    def generate(self, prompt: str, chat: bool, max_tokens: int, emit, cancelled) -> dict:
        rec = self.rec
        n_prompt = len(rec["prompt_ids"])
        rows = sorted(rec.get("parity", []), key=lambda r: r["position"] + r["lag"])
        tokens = rec["tokens"][:max_tokens]
        out: list[dict] = []
        r = 0
        for i, t in enumerate(tokens):
            if self.pause_at is not None and i >= self.pause_at:
                self.paused.set()
                while not cancelled():
                    time.sleep(0.02)
                break
            if cancelled():
                break
            if self.speed > 0 and t["dt_s"]:
                time.sleep(t["dt_s"] / self.speed)
            emit(Token(**t))
            out.append(t)
            reached = n_prompt + i  # positions the recorded backend had computed after emitting token i
            while r < len(rows) and rows[r]["position"] + 1 + rows[r]["lag"] <= reached:
                emit(_parity(rows[r]))
                r += 1
        full = len(out) == len(rec["tokens"])
        res = dict(rec["result"]) if full else {
            "stop_reason": "cancelled", "prefill_tok_s": rec["result"].get("prefill_tok_s", 0.0),
            "time_to_first_token_s": rec["result"].get("time_to_first_token_s", 0.0), "decode_tok_s": 0.0}
        res.update(text="".join(t["text"] for t in out))
        self.history.append({"prompt": prompt, "chat": chat, "replayed_from": str(self.path), "result": res})
        emit(Done(res))
        # the shadow catches up once the generation is over: the recorded rows of the positions reached
        reached = n_prompt + len(out) - 1
        done = rows[r - 1]["position"] + 1 if r else 0
        for row in rows[r:]:
            if row["position"] < reached:
                emit(_parity(row))
                done = row["position"] + 1
        emit(ShadowProgress(done, reached, None, "caught up" if done >= reached else "behind"))
        return res

    def new_conversation(self, system=None) -> None:
        self.conversation.reset(system)

    def bisect(self, emit):
        b = (self.data.get("bisects") or [None])[-1]
        if b is None:
            emit(Status("bisect: none in the recorded session", "bisect"))
            return None
        ev = Bisected(**b)
        emit(ev)
        return ev

    def run_gates(self, emit, cancelled) -> list[GateRow]:
        rows = [GateRow(**g) for g in self.data.get("gates", [])]
        if not rows:
            emit(Status(f"gates: {self.gates_note()}", "gates"))
        for row in rows:
            emit(row)
        if rows:
            emit(Status(gates_summary(rows) + " (recorded)", "gates"))
        return rows

    def session(self) -> dict:
        return self.data | {"replayed": self.history}

    def save(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.session(), indent=1, ensure_ascii=False))
        return path

    def close(self) -> None:
        return None


def _parity(row: dict) -> Parity:
    """A recorded parity row (JSON null = NaN) as the event."""
    return Parity(**(row | {"cosines": [float("nan") if c is None else c for c in row["cosines"]]}))
