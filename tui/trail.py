"""The shadow trails the backend: the backend queues each step's token ids and block outputs and never waits; the
shadow works through the queue only while no generation or gate runs (idle time) and catches up after; a pass
in flight stops between blocks as soon as a generation starts. (The thread is not niced: a nice-19 thread that
holds the GIL when it is descheduled stalls the generation thread, which needs the GIL between kernels.)
Nothing here imports textual.

Queue rules (:meth:`Trail.push`): steps are kept in position order; a step that starts at or before queued
positions (a new turn that reuses a prefix of the KV cache, a fresh sequence) supersedes them, because the
backend overwrote those positions; the positions before it are the same tokens for both. The block outputs
waiting for comparison are kept within :data:`PENDING_BYTES` (the oldest are dropped past it: their tokens are
still run through the shadow to keep its KV cache right, but they get no cosines).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np

from tui.events import Failed, Parity, ShadowProgress

PENDING_BYTES = int(os.environ.get("APR_TUI_PENDING_MB", "256")) * 2**20
CHUNK = 32  # most positions per shadow pass (a pass also pauses between layers when a generation starts)


@dataclass
class Step:
    """Backend positions p0..p0+k-1: their ids (k,) and block outputs (n_layer, k, D) (None: dropped)."""

    gen: object
    p0: int
    ids: np.ndarray
    cap: np.ndarray | None


class Trail:
    """The queue between the backend (``push``, never blocks on the shadow) and the shadow worker (``run``)."""

    def __init__(self, pending_bytes: int = PENDING_BYTES) -> None:
        self.cv = threading.Condition()
        self.pending: list[Step] = []
        self.pending_bytes = pending_bytes
        self.backend_pos = 0  # positions the backend's KV cache holds
        self.shadow_pos = 0  # positions the shadow's KV cache holds
        self.busy = 0  # foreground jobs running (generation, a gate): the shadow waits
        self.working = False  # the shadow is inside a pass
        self.tok_s: float | None = None  # the shadow's last pass rate (positions per second of pass time)

    # -- backend side ------------------------------------------------------------------------------
    def push(self, gen, p0: int, ids: np.ndarray, cap: np.ndarray | None) -> None:
        """Queue backend positions p0.. (called from the generation thread after each eval)."""
        with self.cv:
            self.backend_pos = p0 + ids.size
            while self.pending and self.pending[-1].p0 >= p0:
                self.pending.pop()
            if self.pending:
                last = self.pending[-1]
                keep = p0 - last.p0
                if keep < last.ids.size:
                    last.ids = last.ids[:keep]
                    last.cap = None if last.cap is None else last.cap[:, :keep]
            self.pending.append(Step(gen, p0, ids, cap))
            total = sum(s.cap.nbytes for s in self.pending if s.cap is not None)
            for s in self.pending:
                if total <= self.pending_bytes:
                    break
                if s.cap is not None:
                    total -= s.cap.nbytes
                    s.cap = None
            self.cv.notify_all()

    @contextmanager
    def foreground(self):
        """While inside, the shadow does not start (or continue) a pass: the job has the CPU."""
        with self.cv:
            self.busy += 1
        try:
            yield
        finally:
            with self.cv:
                self.busy -= 1
                self.cv.notify_all()

    @property
    def behind(self) -> int:
        """Backend positions the shadow has not run yet."""
        return max(0, self.backend_pos - self.shadow_pos) if self.pending or self.working else 0

    def wait_idle(self, cancelled: Callable[[], bool]) -> bool:
        """Block until nothing runs in the foreground and the shadow has caught up; False if cancelled."""
        with self.cv:
            while self.busy or self.pending or self.working:
                if cancelled():
                    return False
                self.cv.wait(0.1)
        return True

    # -- shadow side -------------------------------------------------------------------------------
    def pause_point(self, cancelled: Callable[[], bool] = lambda: False) -> None:
        """Called by the shadow between layers: wait while a foreground job runs."""
        with self.cv:
            while self.busy and not cancelled():
                self.cv.wait(0.1)

    def _take(self, cancelled: Callable[[], bool]) -> list[Step] | None:
        """Wait for queued steps and an idle CPU, then take up to CHUNK contiguous positions."""
        with self.cv:
            while not self.pending or self.busy:
                if cancelled():
                    return None
                self.cv.wait(0.1)
            out, n = [], 0
            while self.pending and n < CHUNK:
                s = self.pending[0]
                k = min(s.ids.size, CHUNK - n)
                if k < s.ids.size:
                    out.append(Step(s.gen, s.p0, s.ids[:k], None if s.cap is None else s.cap[:, :k]))
                    s.p0, s.ids, s.cap = s.p0 + k, s.ids[k:], None if s.cap is None else s.cap[:, k:]
                else:
                    out.append(self.pending.pop(0))
                n += k
                if self.pending and self.pending[0].p0 != s.p0 + k:
                    break  # a rewind follows: run it in the next pass
            self.working = True
            return out

    def run(self, sh, emit: Callable[[object], None], cancelled: Callable[[], bool]) -> None:
        """The shadow worker: pass after pass over the queue until cancelled; emits a :class:`Parity` per
        compared position and a :class:`ShadowProgress` after each pass."""
        from tui.shadow import layer_cosines

        while not cancelled():
            steps = self._take(cancelled)
            if steps is None:
                return
            try:
                self._pass(sh, steps, emit, cancelled, layer_cosines)
            except Exception as exc:  # noqa: BLE001 - shadow broken: say so, keep generating
                emit(Failed("shadow", f"{type(exc).__name__}: {exc}", "per-layer parity off"))
                return
            finally:
                with self.cv:
                    self.working = False
                    self.cv.notify_all()

    def _pass(self, sh, steps: list[Step], emit, cancelled, layer_cosines) -> None:
        p0 = steps[0].p0
        if p0 > sh.n_past:  # cannot happen (the queue is contiguous); never compare against a gap
            raise RuntimeError(f"shadow at position {sh.n_past} was handed position {p0}")
        sh.rewind(p0)
        ids = np.concatenate([s.ids for s in steps])
        t = time.perf_counter()
        out = sh.advance(ids, pause=lambda: self.pause_point(cancelled))  # (L, k, D)
        t = time.perf_counter() - t
        with self.cv:
            self.shadow_pos = sh.n_past
            self.tok_s = ids.size / t if t > 0 else None
            backend = self.backend_pos
        j = 0
        for s in steps:
            if s.cap is not None:
                cos = layer_cosines(s.cap, out[:, j:j + s.ids.size])  # (L, k)
                n_prompt = len(getattr(s.gen, "prompt_ids", ()))
                for i in range(s.ids.size):
                    pos = s.p0 + i
                    row = Parity(pos, pos - n_prompt if pos >= n_prompt else None, [float(x) for x in cos[:, i]],
                                 max(0, backend - pos - 1), sh.label)
                    if hasattr(s.gen, "parity"):
                        s.gen.parity.append(asdict(row) | {"cosines": [_finite(x) for x in row.cosines]})
                    emit(row)
            j += s.ids.size
        emit(ShadowProgress(sh.n_past, backend, self.tok_s, "catching up" if self.pending else "caught up"))


def _finite(x: float) -> float | None:
    """x, or None for NaN / inf (JSON has neither)."""
    return x if np.isfinite(x) else None
