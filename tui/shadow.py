"""Shadows: a second, independent computation of each block's output (post_ffn_residual) for the tokens
the running backend processes, so the dashboard can show a per-layer cosine for every token.

Every shadow keeps its own KV cache and is fed the same token ids as the backend, in batches: the shadow
worker takes all tokens that arrived since its last pass and runs them as one chunk (positions
n_past..n_past+k-1). A batch costs about one pass over the weights whatever k is, so a slow shadow lags a
few tokens behind the backend but still covers every token; the panel says which token it shows.

* ``reference``: :class:`ReferenceShadow`, the project's float64 reference backend itself
  (:class:`apr_numba.backends.reference.ReferenceModel`, gguf-py dequantization, its ``eval`` over a float64
  ``RefState`` KV cache), with a weight budget (:data:`REF_CACHE_BYTES`): the blocks past it are streamed one
  tensor at a time from the memory-mapped file. Independent of the Numba kernels and of the packed weights.
* ``cpu``: :class:`CpuShadow`, the Numba CPU forward of the same model (same packed weights) on its own
  CPU KV cache. Against the OpenCL backend it is an independent implementation; against the CPU backend it
  compares the per-token decode path with the batched (prefill-tile) path of the same kernels, a
  consistency check, not an oracle.
* ``opencl``: :class:`OpenCLShadow`, a second ``OpenCLBackend`` instance (own buffers and KV cache).

Nothing here imports textual.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

REF_CACHE_BYTES = int(os.environ.get("APR_TUI_REF_CACHE_MB", "64")) * 2**20  # default float64 weight budget
SHADOWS = ("reference", "cpu", "opencl", "off")


class ShadowUnavailable(Exception):
    """The requested shadow cannot run here (message says why)."""


def layer_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine per layer and position of two (n_layer, T, D) arrays, accumulated in float64 -> (n_layer, T).

    0 where a norm is 0 (as apr_numba.backends.parity.cosine); NaN stays NaN.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    dot = np.einsum("ltd,ltd->lt", a, b)
    na, nb = np.sqrt(np.einsum("ltd,ltd->lt", a, a)), np.sqrt(np.einsum("ltd,ltd->lt", b, b))
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / (na * nb)
    cos[(na == 0) | (nb == 0)] = 0.0
    return cos


class StreamedBlock(Mapping):
    """Block ``il``'s weights as :meth:`ReferenceModel.block` reads them (``w["attn_q.weight"]``...), each
    tensor dequantized to float64 (``ReferenceModel.weight``) only when read and not kept, and its pages of the
    memory-mapped file released right after (``source.release_tensor``, MADV_DONTNEED), so a pass holds one
    float64 tensor at a time (the largest: an FFN matrix, n_ff x n_embd x 8 bytes) and the file's pages do not
    pile up in the resident set."""

    def __init__(self, ref, il: int, source=None) -> None:
        self.ref, self.source, self.prefix = ref, source, f"blk.{il}."
        self.names = {ts.name[len(self.prefix):]: ts.name for ts in ref.spec.block_tensors(il).values()}

    def __getitem__(self, key: str) -> np.ndarray:
        name = self.names[key]
        w = self.ref.weight(name)
        release = getattr(self.source, "release_tensor", None)
        if release is not None:
            release(name)
        return w

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def nbytes(self) -> int:
        """float64 bytes of the whole block (what keeping it dequantized costs)."""
        return sum(8 * int(np.prod(self.ref.tensors[n].shape)) for n in self.names.values())


class ReferenceShadow:
    """The project's float64 reference backend (:class:`apr_numba.backends.reference.ReferenceModel`) with its
    own KV cache (:class:`~apr_numba.backends.reference.RefState`), fed in chunks: a thin wrapper, no math here.

    Args:
        model: the loaded apr_numba Model (its open source and ArchSpec are shared, nothing is re-parsed).
        budget_bytes: float64 weights kept between passes: the first blocks that fit stay dequantized (a
            pass visits every block in order, so least-recently-used eviction would never hit); the others are
            streamed one tensor at a time from the memory-mapped file (:class:`StreamedBlock`) as each pass runs,
            so the memory is O(budget + one tensor + the KV cache), whatever the model.
    """

    kind = "reference"

    def __init__(self, model, budget_bytes: int | None = None) -> None:
        self.model = model
        self.budget = REF_CACHE_BYTES if budget_bytes is None else int(budget_bytes)
        self.label = "backend vs float64 NumPy reference (own KV cache)"
        self.ref = self.state = None
        self._blas = None
        self.kept: dict[int, dict] = {}  # blocks kept dequantized (within the budget)
        self.kept_bytes = 0

    def prepare(self, progress=None) -> None:
        """Open the reference over the model's source (cheap: weights are dequantized as passes need them)."""
        from apr_numba.backends.reference import ReferenceModel
        from apr_numba.debug.tracing import single_thread_blas

        try:
            self.ref = ReferenceModel.from_source(self.model.source, self.model.spec, budget_bytes=0)
        except Exception as exc:  # noqa: BLE001 - e.g. a format the reference cannot read
            raise ShadowUnavailable(f"reference unavailable for {Path(self.model.path).name}: {exc}") from None
        self.state = self.ref.new_state(self.model.n_ctx)
        self._blas = single_thread_blas()

    @property
    def n_past(self) -> int:
        return 0 if self.state is None else self.state.n_past

    def block_weights(self, il: int):
        """Block ``il``'s float64 weights: kept (dequantized once, while within the budget) or streamed."""
        if il in self.kept:
            return self.kept[il]
        w = StreamedBlock(self.ref, il, self.model.source)
        size = w.nbytes()
        if self.kept_bytes + size <= self.budget:
            self.kept[il] = {k: w[k] for k in w}
            self.kept_bytes += size
            return self.kept[il]
        return w

    def reset(self) -> None:
        self.rewind(0)

    def rewind(self, n_past: int) -> None:
        """Forget positions from ``n_past`` on (the backend overwrote them): the cache keeps the first n_past."""
        st = self.state
        if st is not None and n_past < st.n_past:
            st.k, st.v = [k[:n_past] for k in st.k], [v[:n_past] for v in st.v]
            st.n_past = int(n_past)

    def advance(self, ids, pause=None) -> np.ndarray:
        """Append ``ids`` (k,) at positions n_past.. and return each block's output float64 (n_layer, k, D).

        ``ReferenceModel.eval``'s pass, block by block through the reference's public ``block(..., past=)``
        and ``last_kv`` (all math stays in reference.py), with ``pause()`` called before each block: the trail
        waits there while a generation runs, so a pass in flight yields the CPU within one block. NumPy's
        OpenBLAS runs on one thread during the pass: beside Numba kernels that use every core, its threads only
        spin (a small gemv was 50x slower with them on 2 shared cores).
        """
        if self.ref is None:
            self.prepare()
        ref, st = self.ref, self.state
        ids = np.asarray(ids, np.int64).reshape(-1)
        if pause is None:
            pause = _no_pause
        if st.n_past + ids.size > st.n_ctx:
            raise ValueError(f"{st.n_past + ids.size} positions exceed the shadow's context of {st.n_ctx}")
        n_layer = ref.config.n_layer
        positions = np.arange(st.n_past, st.n_past + ids.size)
        out = np.empty((n_layer, ids.size, ref.config.n_embd))
        with self._blas:
            x = ref.token_embd(ids)
            for il in range(n_layer):
                pause()
                past = (st.k[il], st.v[il]) if il < len(st.k) else None
                x = out[il] = ref.block(self.block_weights(il), x, positions, layer=il, past=past)
                k, v = ref.last_kv
                if il < len(st.k):
                    st.k[il], st.v[il] = k, v
                else:
                    st.k.append(k)
                    st.v.append(v)
        st.n_past += ids.size
        return out


def _no_pause() -> None:
    return None


class CpuShadow:
    """The Numba CPU forward on its own CPU KV cache (see the module docstring for what it compares)."""

    kind = "cpu"

    def __init__(self, model) -> None:
        self.model = model
        self.state = model.new_state(cpu=True)

    @property
    def label(self) -> str:
        if self.model.backend == "cpu":
            return "CPU decode vs CPU batched path, same weights (not independent)"
        return f"{self.model.backend} backend vs Numba CPU forward (own KV cache)"

    def prepare(self, progress=None) -> None:
        return None

    @property
    def n_past(self) -> int:
        return self.state.n_past

    def reset(self) -> None:
        self.state.n_past = 0

    def rewind(self, n_past: int) -> None:
        self.state.n_past = min(self.state.n_past, int(n_past))

    def advance(self, ids, pause=None) -> np.ndarray:
        _, cap = self.model.eval(ids, n_logits=0, capture_layers=True, state=self.state)
        return cap


class OpenCLShadow:
    """A second OpenCL backend instance (own buffers, queue and KV cache)."""

    kind = "opencl"

    def __init__(self, model) -> None:
        try:
            from apr_numba.backends.opencl import OpenCLBackend
        except Exception as exc:  # noqa: BLE001 - pyopencl or the module missing
            raise ShadowUnavailable(f"OpenCL shadow unavailable: {type(exc).__name__}: {exc}") from None
        self.model, self._cls = model, OpenCLBackend
        self.be = self.state = None
        self.label = "backend vs OpenCL backend (own instance and KV cache)"

    def prepare(self, progress=None) -> None:
        try:
            self.be = self._cls(self.model)
        except Exception as exc:  # noqa: BLE001 - no device, build failure
            raise ShadowUnavailable(f"OpenCL shadow unavailable: {type(exc).__name__}: {exc}") from None
        self.state = self.be.new_state()
        self.label = f"backend vs OpenCL on {self.be.device_name} (own instance and KV cache)"

    @property
    def n_past(self) -> int:
        return 0 if self.state is None else self.state.n_past

    def reset(self) -> None:
        if self.state is not None:
            self.state.n_past = 0

    def rewind(self, n_past: int) -> None:
        if self.state is not None:
            self.state.n_past = min(self.state.n_past, int(n_past))

    def advance(self, ids, pause=None) -> np.ndarray:
        if self.be is None:
            self.prepare()
        c = self.model.config
        toks = np.asarray(ids, np.int64).reshape(-1)
        cap = np.empty((c.n_layer, toks.size, c.n_embd), np.float32)
        self.be.run(toks, np.empty((0, c.n_vocab), np.float32), cap, self.state)
        self.state.n_past += toks.size
        return cap


def make_shadow(kind: str, model, budget_bytes: int | None = None):
    """The shadow named ``kind`` for ``model``, or None for "off".

    Raises:
        ShadowUnavailable: the shadow cannot run for this model / machine.
    """
    if kind == "off":
        return None
    if kind == "reference":
        return ReferenceShadow(model, budget_bytes)
    if kind == "cpu":
        return CpuShadow(model)
    if kind == "opencl":
        return OpenCLShadow(model)
    raise ValueError(f"unknown shadow {kind!r} (choose from {', '.join(SHADOWS)})")


def default_shadow(model) -> str:
    """``cpu`` when the backend is OpenCL (an independent implementation that keeps up with generation),
    else ``reference`` (the float64 oracle; the Numba CPU forward against itself would prove little)."""
    return "cpu" if model.backend != "cpu" else "reference"
