"""Parallel decode slots on one engine thread (llama-server's ``--parallel`` slots).

Each :class:`Slot` owns a KV state (``model.new_state()``) and at most one :class:`Job` (a request being
generated, a :class:`~apr_numba.decoding.SequenceDecoder`). The engine thread loops: admit waiting jobs into
free slots (prefill), then :meth:`Scheduler.step` -- retire cancelled jobs, sample one token for every
active job, and evaluate the sampled tokens (:meth:`Scheduler.forward`). Jobs are admitted and retired only
between steps. The Numba kernels release the GIL, so the asyncio server thread keeps serving while the
engine computes.

The slots' KV states are rows of one stacked cache (:meth:`~apr_numba.model.Model.new_states`), and
:meth:`Scheduler.forward` evaluates the sampled tokens of all active slots in one batched forward
(:meth:`~apr_numba.model.Model.eval_batch`: the weights are read once for the B tokens, attention per slot at
its own position). Prefill stays per job (one forward of the prompt). Measured with
``bench/serve_batching.py`` (AMD EPYC, 2 cores shared with other work): aggregate decode of 4 sequences
1.56-1.74x one sequence for smollm2-135m (medians), 1.83-1.99x for qwen2.5-coder-0.5b (it was 1.01x with
one forward per slot); the 4-token product tiles are compute-bound at ~1.7-2.2x the per-token rate of the mat-vec
(docs/performance.md, "Batched decode").

Prompt-prefix reuse: a slot keeps the tokens of its last sequence; a new job goes to the free slot whose
cached tokens share the longest prefix with its prompt, and only the rest is prefilled.

Back-pressure: at most ``queue_size`` jobs wait for a slot; :meth:`Scheduler.submit` raises
:class:`QueueFull` beyond that (the server answers 503).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from apr_numba.generation.decoding import SequenceDecoder, TokenEvent, common_prefix_len
from apr_numba.generation.generate import GenerationResult
from apr_numba.generation.sampling import SamplingParams
from apr_numba.model.decoder import cached_tokens

__all__ = ["Job", "QueueFull", "Scheduler", "Slot"]


class QueueFull(Exception):
    """Every slot is busy and the wait queue holds ``queue_size`` jobs."""


@dataclass
class Job:
    """A generation request.

    ``emit(item)`` is called on the engine thread with each :class:`TokenEvent`, then once with the finished
    :class:`GenerationResult` (or with an Exception); it must not block (the server hands the item over to
    its event loop). ``cancel()`` may be called from any thread; the job ends before the next step.
    """

    ids: Sequence[int]
    params: SamplingParams
    max_tokens: int
    emit: Callable[[object], None]
    stop: Sequence[str] = ()
    logprobs: int | None = None
    result: GenerationResult = field(default_factory=GenerationResult)
    cancelled: bool = False
    submitted_s: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class Slot:
    """A KV state and the job it runs (None when free)."""

    index: int
    state: object
    job: Job | None = None
    seq: SequenceDecoder | None = None
    last_used: float = 0.0


class Scheduler:
    """N parallel slots, a bounded wait queue and the engine thread that steps them.

    Args:
        model: a loaded :class:`~apr_numba.model.Model`.
        n_parallel: slots (sequences decoded together), >= 1.
        queue_size: jobs that may wait for a slot, >= 0.
        n_ctx: KV positions per slot (default: the model's).

    Counters: ``n_steps``, ``n_prefilled`` / ``n_reused`` (prompt tokens evaluated / taken from a slot's
    cache), ``n_completed``, ``n_cancelled``.
    """

    def __init__(self, model, n_parallel: int = 1, queue_size: int = 16, n_ctx: int | None = None):
        if n_parallel < 1 or queue_size < 0:
            raise ValueError("n_parallel must be >= 1 and queue_size >= 0")
        self.model = model
        # one stacked KV cache, a row per slot, so that a step runs every active slot in one forward
        self.slots = [Slot(i, st) for i, st in enumerate(model.new_states(n_parallel, n_ctx))]
        self.n_ctx = self.slots[0].state.n_ctx
        self.queue_size = queue_size
        self.waiting: deque[Job] = deque()
        self.cv = threading.Condition()
        self._stop = False
        self.thread: threading.Thread | None = None
        self.n_steps = self.n_prefilled = self.n_reused = self.n_completed = self.n_cancelled = 0

    # -- client side (any thread) -------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job``. Raises QueueFull when the wait queue is full, RuntimeError after stop()."""
        with self.cv:
            if self._stop:
                raise RuntimeError("the server is shutting down")
            free = sum(s.job is None for s in self.slots)
            if len(self.waiting) >= self.queue_size + free:
                raise QueueFull(f"{len(self.waiting)} requests are waiting for a slot (--queue {self.queue_size})")
            self.waiting.append(job)
            self.cv.notify()

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="apr-numba-engine", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel every waiting and running job (each gets its result, stop_reason "cancelled") and join."""
        with self.cv:
            self._stop = True
            self.cv.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    @property
    def n_active(self) -> int:
        return sum(s.job is not None for s in self.slots)

    # -- engine thread -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cv:
                while not self._stop and not self.waiting and self.n_active == 0:
                    self.cv.wait()
                if self._stop:
                    break
            self._admit()
            self.step()
        for s in self.slots:
            if s.job is not None:
                s.job.cancel()
        self.step()  # retires the cancelled jobs
        with self.cv:
            waiting, self.waiting = list(self.waiting), deque()
        for job in waiting:
            job.result.stop_reason = "cancelled"
            job.emit(job.result)

    def _pick_slot(self, job: Job) -> Slot | None:
        free = [s for s in self.slots if s.job is None]
        if not free:
            return None
        # the longest cached prefix first, then the least recently used
        return max(free, key=lambda s: (common_prefix_len(cached_tokens(s.state), job.ids), -s.last_used))

    def _admit(self) -> None:
        """Move waiting jobs into free slots and prefill them."""
        while True:
            with self.cv:
                if not self.waiting:
                    return
                slot = self._pick_slot(self.waiting[0])
                if slot is None:
                    return
                job = self.waiting.popleft()
            if job.cancelled:
                job.result.stop_reason = "cancelled"
                self.n_cancelled += 1
                job.emit(job.result)
                continue
            try:
                seq = SequenceDecoder(self.model, job.ids, job.params, job.max_tokens, job.stop, state=slot.state,
                                      result=job.result, logprobs=job.logprobs, reuse=True)
                seq.start()
            except Exception as exc:  # a bad request that passed the server's checks: report it, keep serving
                slot.state.n_past = 0
                job.emit(exc)
                continue
            self.n_prefilled += seq.prefilled
            self.n_reused += seq.reused
            slot.job, slot.seq = job, seq
            if seq.done:  # max_tokens == 0
                self._retire(slot)

    def _retire(self, slot: Slot) -> None:
        job = slot.job
        slot.job = slot.seq = None
        slot.last_used = time.perf_counter()
        if job.result.stop_reason == "cancelled":
            self.n_cancelled += 1
        else:
            self.n_completed += 1
        job.emit(job.result)

    def _emit(self, slot: Slot, events: list[TokenEvent]) -> None:
        for ev in events:
            slot.job.emit(ev)

    def step(self) -> None:
        """One decode step: retire cancelled jobs, sample a token for each active job, evaluate the tokens."""
        active = [s for s in self.slots if s.job is not None]
        todo = []
        for s in active:
            try:
                if s.job.cancelled:
                    self._emit(s, s.seq.cancel())
                else:
                    self._emit(s, s.seq.sample())
            except Exception as exc:  # never let one sequence take the engine down
                s.seq.done = True
                s.state.n_past = 0
                s.job.emit(exc)
                s.job = s.seq = None
                continue
            if s.seq.done:
                self._retire(s)
            else:
                todo.append(s)
        if todo:
            self.forward(todo)
            self.n_steps += 1

    def forward(self, slots: list[Slot]) -> None:
        """Evaluate each slot's sampled token on its own KV state, all in one batched forward
        (:meth:`~apr_numba.model.Model.eval_batch`), and hand each sequence its row of the logits."""
        logits = self.model.eval_batch([s.seq.next_token for s in slots], [s.state for s in slots])
        for s, row in zip(slots, logits, strict=True):
            s.seq.feed(row)
