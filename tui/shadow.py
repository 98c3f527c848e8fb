"""Shadows: a second, independent computation of each block's output (post_ffn_residual) for the tokens
the running backend processes, so the dashboard can show a per-layer cosine for every token.

Every shadow keeps its own KV cache and is fed the same token ids as the backend, in batches: the shadow
worker takes all tokens that arrived since its last pass and runs them as one chunk (positions
n_past..n_past+k-1). A batch costs about one pass over the weights whatever k is, so a slow shadow lags a
few tokens behind the backend but still covers every token; the panel says which token it shows.

* ``reference``: :class:`ReferenceShadow`, float64 NumPy (:mod:`apr_numba.backends.reference`'s math and weights,
  gguf-py dequantization). ReferenceModel.forward re-dequantizes every block on each call and has no KV cache,
  so it cannot run per token. This shadow dequantizes one block at a time (keeping the first blocks that fit
  :data:`REF_CACHE_BYTES`, re-dequantizing the others on each pass) and adds a float64 KV cache; the block
  math is reference.py's, step for step (tests/test_tui_engine.py checks it against
  ``ReferenceModel.forward_traced``). Independent of the Numba kernels and of the packed weights.
* ``cpu``: :class:`CpuShadow`, the Numba CPU forward of the same model (same packed weights) on its own
  CPU KV cache. Against the OpenCL backend it is an independent implementation; against the CPU backend it
  compares the per-token decode path with the batched (prefill-tile) path of the same kernels, a
  consistency check, not an oracle.
* ``opencl``: :class:`OpenCLShadow`, a second ``OpenCLBackend`` instance (own buffers and KV cache).

Nothing here imports textual.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

REF_CACHE_BYTES = int(os.environ.get("APR_TUI_REF_CACHE_MB", "128")) * 2**20  # default float64 weight budget
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


class ReferenceShadow:
    """float64 NumPy forward with a KV cache, fed in chunks (see the module docstring).

    Args:
        model: the loaded apr_numba Model (its open source and config are shared, nothing is re-parsed).
        budget_bytes: float64 block weights kept between passes (the first blocks that fit); the others are
            dequantized again on each pass and their file pages released after, so the shadow's memory is
            O(budget + one block + its KV cache), whatever the model size.
    """

    kind = "reference"

    def __init__(self, model, budget_bytes: int | None = None) -> None:
        self.model = model
        self.config = model.config
        self.budget = REF_CACHE_BYTES if budget_bytes is None else int(budget_bytes)
        self.label = "backend vs float64 NumPy reference (own KV cache)"
        self.ref = None
        self._blocks: dict[int, dict[str, np.ndarray]] = {}
        self._kept_bytes = 0
        self.n_past = 0
        self._k = self._v = None  # float64 (n_layer, capacity, n_head_kv, head_dim)

    def prepare(self, progress=None) -> None:
        """Open the reference over the model's source (cheap: no weight is dequantized until a pass needs it)."""
        from apr_numba.debug.tracing import reference_model, single_thread_blas

        try:
            self.ref = reference_model(self.model)  # shared with bisect's reference side
        except Exception as exc:  # noqa: BLE001 - e.g. a format the reference cannot read
            raise ShadowUnavailable(f"reference unavailable for {Path(self.model.path).name}: {exc}") from None
        self._blas = single_thread_blas()

    def _block(self, il: int) -> dict[str, np.ndarray]:
        """Block il's float64 weights: kept ones from memory, else dequantized now (kept if the budget allows)."""
        w = self._blocks.get(il)
        if w is None:
            w = self.ref.load_block(il)
            n = sum(a.nbytes for a in w.values())
            if self._kept_bytes + n <= self.budget:
                self._blocks[il] = w
                self._kept_bytes += n
            release = getattr(self.model.source, "release_tensor", None)
            if release is not None:  # the raw pages read for the dequantization leave the resident set
                for name in w:
                    release(f"blk.{il}.{name}")
        return w

    def reset(self) -> None:
        self.n_past = 0

    def rewind(self, n_past: int) -> None:
        """Forget positions from ``n_past`` on (the backend overwrote them)."""
        self.n_past = min(self.n_past, int(n_past))

    def _grow(self, need: int) -> None:
        c = self.config
        cap = 0 if self._k is None else self._k.shape[1]
        if need <= cap:
            return
        new = max(need, 2 * cap, 64)
        shape = (c.n_layer, new, c.n_head_kv, c.head_dim)
        k, v = np.zeros(shape), np.zeros(shape)
        if cap:
            k[:, :cap], v[:, :cap] = self._k, self._v
        self._k, self._v = k, v

    def advance(self, ids, n_layers: int | None = None, pause=None) -> np.ndarray:
        """Append ``ids`` (k,) at positions n_past.. and return each block's output float64 (n_layer, k, D).

        ``n_layers`` runs only the first blocks (tests); the cache then holds only theirs. ``pause()`` is
        called before each block (the trail waits there while a generation runs). NumPy's OpenBLAS runs on
        one thread during the pass: beside Numba kernels that use every core, its threads only spin (a small
        gemv was 50x slower with them on 2 shared cores).
        """
        if self.ref is None:
            self.prepare()
        from apr_numba.debug.tracing import single_thread_blas

        with getattr(self, "_blas", None) or single_thread_blas():
            return self._advance(ids, n_layers, pause)

    def _advance(self, ids, n_layers: int | None, pause) -> np.ndarray:
        ids = np.asarray(ids, np.int64).reshape(-1)
        c = self.config
        t, p0 = ids.size, self.n_past
        n = c.n_layer if n_layers is None else n_layers
        self._grow(p0 + t)
        out = np.empty((n, t, c.n_embd))
        x = self.ref.token_embd(ids)  # (t, D) float64
        for il in range(n):
            if pause is not None:
                pause()
            x = self._block_kv(il, self._block(il), x, p0)
            out[il] = x
        self.n_past = p0 + t
        return out

    def _block_kv(self, il: int, w: dict, x: np.ndarray, p0: int) -> np.ndarray:
        """reference.ReferenceModel.block for queries at positions p0..p0+t-1 over the cached keys 0..p0+t-1."""
        from apr_numba.backends.reference import rms_norm, rope, silu, softmax

        c = self.config
        t = x.shape[0]
        s = p0 + t  # keys visible to the last query
        pos = np.arange(p0, s)
        # --- self-attention
        h = rms_norm(x, w["attn_norm.weight"], c.rms_eps)
        q, k, v = (h @ w[f"attn_{n}.weight"].T for n in "qkv")  # (t, q_dim), (t, kv_dim) x2
        if "attn_q.bias" in w:
            q, k, v = q + w["attn_q.bias"], k + w["attn_k.bias"], v + w["attn_v.bias"]
        q = rope(q.reshape(t, c.n_head, c.head_dim), pos, c.rope_theta, c.rope_type)  # (t, H, hd)
        self._k[il, p0:s] = rope(k.reshape(t, c.n_head_kv, c.head_dim), pos, c.rope_theta, c.rope_type)
        self._v[il, p0:s] = v.reshape(t, c.n_head_kv, c.head_dim)
        keys, vals = self._k[il, :s], self._v[il, :s]  # (s, Hkv, hd)
        mask = np.where(np.arange(s)[None, :] > pos[:, None], -np.inf, 0.0)  # (t, s): no future keys
        att = np.empty((t, c.n_head, c.head_dim))
        scale = 1.0 / math.sqrt(c.head_dim)
        for hh in range(c.n_head):
            kv = hh // c.n_rep
            probs = softmax(q[:, hh, :] @ keys[:, kv, :].T * scale + mask, axis=-1)  # (t, s)
            att[:, hh, :] = probs @ vals[:, kv, :]
        x = x + att.reshape(t, -1) @ w["attn_output.weight"].T
        # --- SwiGLU feed-forward
        h = rms_norm(x, w["ffn_norm.weight"], c.rms_eps)
        return x + (silu(h @ w["ffn_gate.weight"].T) * (h @ w["ffn_up.weight"].T)) @ w["ffn_down.weight"].T


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
