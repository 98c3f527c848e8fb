"""The OpenCL backend: the decoder forward of :mod:`apr_numba.backends.cpu_forward` run by ``opencl/*.cl`` kernels.

It executes the model's :class:`~apr_numba.arch.spec.ArchSpec` (the features in :data:`IMPLEMENTS`; a model
needing another is refused at construction with a message naming it, and the parity gate falls back to the
CPU), loads the tensors the spec names through :mod:`apr_numba.model.plan`, with the CPU path's step order
and math; see ``cpu_forward.py`` for the stage names. Block features and their kernels: QKV bias
(``add_f32.cl``), QK-norm (``arch_ops_f32.cl`` rms_norm_heads, before RoPE), post-norms
(``rms_norm_f32.cl``), SwiGLU / GeGLU (``swiglu_f32.cl``, act_type), the embedding scale and final logit
soft-cap (``arch_ops_f32.cl``), the attention scale and per-layer sliding window (``attn_f32.cl``
arguments), the per-layer RoPE tables (gemma3's local base; ``rope_freqs`` divisors) and the
mixture-of-experts FFN (:mod:`apr_numba.backends.opencl_moe`). Attention logit soft-capping
(``attn_softcap``) is not implemented.

Each matrix is uploaded once, at construction, as the raw GGML blocks of the model file (zero repacking: the
kernels decode blocks with ``vload_half``), so device weight bytes equal the model's tensor bytes (gate
GWR-001). Norm weights (QK-norm included) and QKV biases are float32 in the file and uploaded as they are
(the three biases of a layer side by side); the RoPE cos/sin tables (the CPU path's float32 tables) are
*auxiliary* bytes, counted apart.

Transfers (gates GWR-003 and the issue's counters). Per :meth:`run` call ("step") the host writes only the
token ids (int32: 4 bytes per token, one copy) and reads back only the requested logits (4 * n_vocab bytes
per logits row, one copy per prefill chunk), or with :meth:`eval_argmax` 4 bytes. A decode step therefore
moves 4 bytes host-to-device and 4 * n_vocab (or 4) bytes device-to-host, with ``weight_uploads == 0``; a
MoE model also reads back its router logits, 4 * n_expert bytes per token and layer (the host picks the
top-k experts, :mod:`apr_numba.backends.opencl_moe`). Every copy goes through :meth:`OpenCLBackend._h2d` /
``_d2h`` and is counted in ``counters`` (totals since load), ``last_step`` (the latest call) and
``load_counters``.

Prefill runs in chunks of ``max_batch`` tokens (default 32) through a real matrix-matrix kernel
(``matvec_f32.cl`` with ntok > 1: each decoded weight chunk serves TB tokens).

Errors: :class:`~apr_numba.backends.opencl_kernels.OpenCLError` (no device, build failure),
:class:`~apr_numba.errors.ModelFormatError` (a tensor without an OpenCL kernel or a bad shape),
``pyopencl.Error`` from the driver (out of device memory...). The parity gate turns any of them into a CPU
fallback.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyopencl as cl

from apr_numba.arch.spec import K_NORM, POST_ATTN_NORM, POST_FFN_NORM, Q_NORM, ArchSpec
from apr_numba.arch.stages import STAGE
from apr_numba.backends.opencl_kernels import WTYPES, OpenCLError, Programs, find_device
from apr_numba.backends.opencl_moe import MoEScratch, moe_ffn, upload_experts
from apr_numba.errors import ArgumentError, ModelFormatError
from apr_numba.kernels.rope import spec_rope_tables
from apr_numba.model import plan
from apr_numba.model.weights import LAYER_MATS

# ArchSpec features the device forward executes (apr_numba.arch.traits.FEATURES).
IMPLEMENTS = frozenset({"qkv_bias", "qk_norm", "post_attn_norm", "post_ffn_norm", "gelu_tanh", "embed_scale",
                        "final_softcap", "sliding_window", "rope_freqs", "moe", "attn_scale"})

MF = cl.mem_flags


@dataclass
class TransferCounters:
    """Host<->device copies and bytes. weight_uploads: copies of model weights (load only, never per token)."""

    h2d_bytes: int = 0
    h2d_copies: int = 0
    d2h_bytes: int = 0
    d2h_copies: int = 0
    weight_uploads: int = 0

    def add(self, other: TransferCounters) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    def to_dict(self) -> dict:
        return asdict(self)


def _no_grab(*_args) -> None:
    pass


class _Faults:
    """Per-layer kernel arguments that tracing may change (``opencl_trace.DeviceTrace.layer``); the
    backend's own instance holds the normal values (cos / sin None: the layer's own RoPE tables)."""

    def __init__(self, backend: OpenCLBackend):
        c = backend.config
        self.eps, self.scale = np.float32(c.rms_eps), np.float32(backend.spec.attn_scale)
        self.rope_type, self.cos, self.sin = backend.spec.rope_type, None, None
        self.bias_drop = self.ffn_swap = False
        self.n_keys = self.kv_shift = self.no_max = self.capture = self.cap_nk = 0
        self.cap_s = self.cap_p = backend.argmax_buf  # not written unless capture


class DeviceKVState:
    """A KV cache in device memory and how many positions it holds (the device twin of ``KVState``).

    k_buf, v_buf: float32 (n_layer, n_ctx, kv_dim) device buffers, the CPU path's layout. ``k``/``v``
    read them back (debugging only; counted as device-to-host copies).
    """

    def __init__(self, backend: OpenCLBackend, n_ctx: int):
        c = backend.config
        self.backend, self.n_ctx, self.n_past = backend, int(n_ctx), 0
        self.shape = (c.n_layer, self.n_ctx, c.kv_dim)
        nbytes = 4 * c.n_layer * self.n_ctx * c.kv_dim
        self.k_buf = cl.Buffer(backend.ctx, MF.READ_WRITE, nbytes)
        self.v_buf = cl.Buffer(backend.ctx, MF.READ_WRITE, nbytes)

    @property
    def k(self) -> np.ndarray:
        return self.backend._d2h(np.empty(self.shape, np.float32), self.k_buf)

    @property
    def v(self) -> np.ndarray:
        return self.backend._d2h(np.empty(self.shape, np.float32), self.v_buf)


class OpenCLBackend:
    """The decoder on one OpenCL device.

    Args:
        model_or_source: a :class:`~apr_numba.model.decoder.Model` (its source, spec and n_ctx are used) or a
            weights source (``GGUFFile`` or .apr reader: ``path``, ``tensors``, ``data(name)``).
        spec: the model's :class:`ArchSpec` (required with a source; ignored with a Model).
        device_index: flat OpenCL device index (``list_devices()``); default the first GPU, else the
            first device.
        fault: an injected kernel fault for tests ("scale") or None.
        n_ctx: the longest state (positions); default the Model's, else min(4096, trained context).
        max_batch: tokens per prefill chunk.

    Attributes:
        device_name, device (DeviceInfo), is_gpu, tuning, weight_bytes (device bytes of model tensors),
        weight_buffers (their cl.Buffers), weight_flags (their cl.mem_flags: READ_ONLY, plus
        ALLOC_HOST_PTR on unified-memory devices), aux_bytes (RoPE tables), model_bytes (bytes of all
        tensors of the file), counters, last_step, load_counters, steps (run calls since load), rope_cos /
        rope_sin (lists of the RoPE table buffers; layer i uses table rope_layer[i]).

    Raises:
        OpenCLError, ModelFormatError, pyopencl.Error (see the module docstring).
    """

    def __init__(self, model_or_source, spec: ArchSpec | None = None, device_index: int | None = None,
                 fault: str | None = None, n_ctx: int | None = None, max_batch: int = 32):
        if hasattr(model_or_source, "weights") and hasattr(model_or_source, "source"):
            src, spec = model_or_source.source, model_or_source.spec
            n_ctx = n_ctx or model_or_source.n_ctx
        else:
            src = model_or_source
        if spec is None:
            raise ArgumentError("OpenCLBackend needs the model's ArchSpec with a weights source")
        spec.require("opencl", IMPLEMENTS, str(src.path))
        plan.check_tensors(spec, src)
        config = spec.hp
        self.spec = spec
        found = find_device(device_index)
        if found is None:
            raise OpenCLError("no OpenCL device found")
        self.device, dev = found
        self.device_name = self.device.label()
        self.is_gpu = self.device.is_gpu
        self.config = c = config
        self.n_ctx = int(n_ctx or min(4096, c.n_ctx_train))
        self.max_batch = int(max_batch)
        self.prg = Programs(self.device, dev, c.head_dim, fault)
        self.ctx, self.queue, self.tuning, self.fault = self.prg.ctx, self.prg.queue, self.prg.tuning, fault
        self.counters, self.last_step, self.load_counters = TransferCounters(), TransferCounters(), TransferCounters()
        self._cur = self.load_counters
        self.steps = 0
        # Unified-memory devices (integrated GPUs, PoCL) get host-accessible allocations (GWR-005).
        self.weight_flags = MF.READ_ONLY | (MF.ALLOC_HOST_PTR if self.device.unified_memory else 0)
        self.model_bytes = sum(int(t.nbytes) for t in src.tensors.values())
        self.weight_bytes = self.aux_bytes = 0
        self.weight_buffers: list = []  # every device buffer holding model weights (GWR-001 / GWR-005)
        self._upload_weights(src)
        cos, sin, self.rope_layer = spec_rope_tables(spec, self.n_ctx, plan.rope_freqs(spec, src))
        self.rope_cos = [self._upload(t, aux=True) for t in cos]  # one table per distinct per-layer base
        self.rope_sin = [self._upload(t, aux=True) for t in sin]
        self._alloc_activations()
        self._plain = _Faults(self)
        self._cur = self.last_step

    # -- uploads ---------------------------------------------------------------------------------
    def _upload(self, arr: np.ndarray, aux: bool = False):
        arr = np.ascontiguousarray(arr)
        buf = cl.Buffer(self.ctx, self.weight_flags | MF.COPY_HOST_PTR, hostbuf=arr)
        self._cur.h2d_bytes += arr.nbytes
        self._cur.h2d_copies += 1
        if aux:
            self.aux_bytes += arr.nbytes
        else:
            self._cur.weight_uploads += 1
            self.weight_bytes += arr.nbytes
            self.weight_buffers.append(buf)
        return buf

    @staticmethod
    def _check_matrix(src, ts):
        """The source's tensor of matrix ``ts`` (a TensorSpec, last axis = columns) if a kernel can read it.

        Raises:
            ModelFormatError: its type has no OpenCL kernel, or its columns are not a multiple of 32.
        """
        t = plan.tensor(src, ts)
        if int(t.ggml_type) not in WTYPES:
            raise ModelFormatError(f"{src.path}: {ts.name}: GGML type {t.type_name} has no OpenCL kernel")
        if ts.shape[-1] % 32:
            raise ModelFormatError(f"{src.path}: {ts.name}: {ts.shape[-1]} columns is not a multiple of 32")
        return t

    def _matrix(self, src, ts) -> tuple:
        """(buffer of the raw GGML blocks, ggml type, cols, rows) of matrix ``ts`` (a TensorSpec)."""
        t = self._check_matrix(src, ts)
        buf = self._upload(np.asarray(src.data(ts.name)).view(np.uint8))
        return buf, int(t.ggml_type), ts.shape[1], ts.shape[0]

    def _vector(self, src, specs: list):
        """Float32 vectors (TensorSpecs) side by side, decoded by :func:`apr_numba.model.plan.vector`."""
        return self._upload(np.concatenate([plan.vector(src, ts) for ts in specs]).astype(np.float32, copy=False))

    def _upload_weights(self, src) -> None:
        c, spec = self.config, self.spec
        self.has_bias = spec.qkv_bias
        self.layers = []
        for layer in range(c.n_layer):
            b = spec.block_tensors(layer)
            lw = {"attn_norm": self._vector(src, [b["attn_norm.weight"]]),
                  "ffn_norm": self._vector(src, [b["ffn_norm.weight"]])}
            for slot in LAYER_MATS:
                if not (spec.n_expert and slot.startswith("ffn_")):
                    lw[slot] = self._matrix(src, b[slot + ".weight"])
            if spec.n_expert:
                lw.update(upload_experts(self, src, b))
            if self.has_bias:
                lw["bias"] = self._vector(src, [b[f"attn_{x}.bias"] for x in "qkv"])
            if spec.qk_norm:
                lw["q_norm"], lw["k_norm"] = self._vector(src, [b[Q_NORM]]), self._vector(src, [b[K_NORM]])
            if spec.post_attn_norm:
                lw["post_attn_norm"] = self._vector(src, [b[POST_ATTN_NORM]])
            if spec.post_ffn_norm:
                lw["post_ffn_norm"] = self._vector(src, [b[POST_FFN_NORM]])
            self.layers.append(lw)
        mt = spec.model_tensors()
        self.embd = self._matrix(src, mt["token_embd.weight"])
        self.tied = spec.tied_head
        self.head = self.embd if self.tied else self._matrix(src, mt["output.weight"])
        self.output_norm = self._vector(src, [mt["output_norm.weight"]])

    def _alloc_activations(self) -> None:
        c, B = self.config, self.max_batch
        self.qkv_w = c.q_dim + 2 * c.kv_dim

        def buf(n, dtype=np.float32):
            return cl.Buffer(self.ctx, MF.READ_WRITE, int(n) * np.dtype(dtype).itemsize)

        self.x, self.h, self.o = buf(B * c.n_embd), buf(B * c.n_embd), buf(B * c.n_embd)
        self.qkv, self.att = buf(B * self.qkv_w), buf(B * c.q_dim)
        self.gu, self.act = buf(B * 2 * c.n_ff), buf(B * c.n_ff)
        self.logits_buf = buf(B * c.n_vocab)
        self.scores = buf(B * c.n_head * self.n_ctx)
        self.ids_buf, self.argmax_buf = buf(B, np.int32), buf(1, np.int32)
        self._ids_host = np.zeros(B, np.int32)
        self.moe_scratch = MoEScratch(self) if self.spec.n_expert else None

    # -- transfers -------------------------------------------------------------------------------
    def _h2d(self, buf, arr: np.ndarray) -> None:
        cl.enqueue_copy(self.queue, buf, arr, is_blocking=True)
        self._cur.h2d_bytes += arr.nbytes
        self._cur.h2d_copies += 1

    def _d2h(self, arr: np.ndarray, buf) -> np.ndarray:
        cl.enqueue_copy(self.queue, arr, buf, is_blocking=True)
        self._cur.d2h_bytes += arr.nbytes
        self._cur.d2h_copies += 1
        return arr

    # -- forward ---------------------------------------------------------------------------------
    def new_state(self, n_ctx: int | None = None) -> DeviceKVState:
        """A fresh device KV cache of n_ctx positions (default: the backend's n_ctx).

        Raises:
            ArgumentError: n_ctx outside [1, n_ctx of the backend].
        """
        n = int(n_ctx or self.n_ctx)
        if not 1 <= n <= self.n_ctx:
            raise ArgumentError(f"state n_ctx must be in [1, {self.n_ctx}] (the RoPE table), got {n}")
        return DeviceKVState(self, n)

    def _begin_step(self) -> None:
        self.last_step = self._cur = TransferCounters()

    def _end_step(self) -> None:
        self.counters.add(self.last_step)
        self.steps += 1

    def run(self, toks: np.ndarray, logits: np.ndarray, cap: np.ndarray, state: DeviceKVState, dbg=None) -> None:
        """The forward of ``toks`` (T,) at positions state.n_past.. (``Model._run``'s contract).

        Fills logits (n_out, n_vocab) float32 with the last n_out positions' logits and, when cap has
        layers, cap (n_layer, T, n_embd) with each block's output. Does not advance state.n_past.
        dbg: the CPU forward's tracing / teaching-fault tuple (see ``forward.forward`` and
        :class:`~apr_numba.backends.opencl_trace.DeviceTrace`); the call then runs as one chunk.
        """
        self._begin_step()
        try:
            T, n_out = toks.shape[0], logits.shape[0]
            tr = None
            if dbg is not None:
                from apr_numba.backends.opencl_trace import DeviceTrace

                if T > self.max_batch:
                    self.max_batch = T
                    self._alloc_activations()
                tr = DeviceTrace(self, dbg, T, state.n_past)
            for c0 in range(0, T, self.max_batch):
                tc = min(self.max_batch, T - c0)
                rows = range(max(c0, T - n_out), c0 + tc)  # positions of this chunk that need logits
                self._forward_chunk(toks[c0:c0 + tc], state.n_past + c0, state, cap, c0, tr)
                if len(rows):
                    self._logits(rows.start - c0, len(rows))
                    self._d2h(logits[rows.start - (T - n_out):rows.stop - (T - n_out)], self.logits_buf)
            if tr is not None:
                tr.finish(logits)
        finally:
            self._end_step()

    def eval(self, ids, n_logits: int = 1, state: DeviceKVState | None = None) -> np.ndarray:
        """Append ids to ``state`` and return float32 logits (n_logits, n_vocab), like ``Model.eval``."""
        toks = np.asarray(ids, np.int64).reshape(-1)
        state = state if state is not None else self.new_state()
        self._check(toks, state)
        logits = np.empty((max(0, min(int(n_logits), toks.size)), self.config.n_vocab), np.float32)
        self.run(toks, logits, np.zeros((0, 0, 0), np.float32), state)
        state.n_past += toks.size
        return logits

    def eval_argmax(self, ids, state: DeviceKVState) -> int:
        """Append ids to ``state`` and return the argmax of the last position's logits (greedy decoding),
        computed on the device: only 4 bytes come back."""
        toks = np.asarray(ids, np.int64).reshape(-1)
        self._check(toks, state)
        self._begin_step()
        try:
            T = toks.size
            for c0 in range(0, T, self.max_batch):
                tc = min(self.max_batch, T - c0)
                self._forward_chunk(toks[c0:c0 + tc], state.n_past + c0, state, np.zeros((0, 0, 0), np.float32), c0)
            self._logits(tc - 1, 1)
            self.prg.argmax(self.queue, (self.tuning.wg,), (self.tuning.wg,), self.logits_buf, self.config.n_vocab,
                            self.argmax_buf)
            out = self._d2h(np.zeros(1, np.int32), self.argmax_buf)
        finally:
            self._end_step()
        state.n_past += T
        return int(out[0])

    def _check(self, toks: np.ndarray, state: DeviceKVState) -> None:
        if toks.size == 0:
            raise ArgumentError("no tokens to evaluate (empty prompt)")
        if toks.min() < 0 or toks.max() >= self.config.n_vocab:
            raise ArgumentError(f"token id out of range [0, {self.config.n_vocab}): {int(toks.max())}")
        if state.n_past + toks.size > state.n_ctx:
            raise ArgumentError(f"{state.n_past + toks.size} positions exceed the context length {state.n_ctx}")

    def _forward_chunk(self, toks: np.ndarray, pos0: int, state: DeviceKVState, cap: np.ndarray, c0: int,
                       tr=None) -> None:
        c, prg, q = self.config, self.prg, self.queue
        T, D, F = toks.shape[0], c.n_embd, c.n_ff
        qd, kvd, W = c.q_dim, c.kv_dim, self.qkv_w
        ids = self._ids_host[:T]
        ids[:] = toks
        self._h2d(self.ids_buf, ids)
        e = self.embd
        prg.get_rows(e[1], e[0], D, self.ids_buf, self.x, D, T)  # embedding
        if self.spec.embed_scale != 1.0:
            prg.scale(q, (T * D,), None, self.x, np.float32(self.spec.embed_scale))
        grab = tr.grab if tr is not None else _no_grab
        grab(STAGE.embedding, 0, self.x, D, 0, D)
        wg = self.tuning.wg
        for layer, lw in enumerate(self.layers):
            f = tr.layer(layer) if tr is not None else self._plain  # teaching faults of a traced layer
            off = layer * state.n_ctx * kvd
            prg.rms_norm(q, (wg, T), (wg, 1), self.x, D, 0, lw["attn_norm"], self.h, D, D, f.eps)
            grab(STAGE.attn_norm, layer, self.h, D, 0, D)
            for slot, y_off in (("attn_q", 0), ("attn_k", qd), ("attn_v", qd + kvd)):  # qkv_matmul
                w = lw[slot]
                prg.matvec(w[1], w[0], w[2], w[3], self.h, D, self.qkv, W, y_off, T)
            grab(STAGE.qkv_matmul, layer, self.qkv, W, 0, W)
            if self.has_bias and not f.bias_drop:  # qkv_bias
                prg.add(q, (T * W,), None, self.qkv, lw["bias"], W)
            grab(STAGE.qkv_bias, layer, self.qkv, W, 0, W)
            if "q_norm" in lw:  # QK-norm: RMSNorm of each head, before RoPE
                for col0, nh, wn in ((0, c.n_head, lw["q_norm"]), (qd, c.n_head_kv, lw["k_norm"])):
                    prg.rms_norm_heads(q, (wg, nh, T), (wg, 1, 1), self.qkv, W, col0, c.head_dim, wn, f.eps)
            tab = self.rope_layer[layer]
            cos, sin = (f.cos, f.sin) if f.cos is not None else (self.rope_cos[tab], self.rope_sin[tab])
            for col0, nh in ((0, c.n_head), (qd, c.n_head_kv)):
                prg.rope(q, (nh * c.head_dim // 2, T), None, self.qkv, W, col0, c.head_dim, pos0, cos, sin,
                         f.rope_type)
            grab(STAGE.q_post_rope, layer, self.qkv, W, 0, qd)
            grab(STAGE.k_post_rope, layer, self.qkv, W, qd, kvd)
            prg.cpy_kv(q, (kvd, T), None, self.qkv, W, qd, kvd, state.k_buf, state.v_buf, off, pos0)
            prg.attn(q, (wg, c.n_head, T), (wg, 1, 1), self.qkv, W, state.k_buf, state.v_buf, off, kvd, c.n_rep,
                     pos0, self.scores, self.n_ctx, self.att, qd, f.scale, self.spec.layer_window[layer], f.n_keys,
                     f.kv_shift, f.no_max, f.capture, f.cap_s, f.cap_p, f.cap_nk)
            if f.capture:
                tr.grab_attention(layer)
            grab(STAGE.attention, layer, self.att, qd, 0, qd)
            w = lw["attn_output"]
            prg.matvec(w[1], w[0], w[2], w[3], self.att, qd, self.o, D, 0, T)
            grab(STAGE.attn_out, layer, self.o, D, 0, D)
            if "post_attn_norm" in lw:
                prg.rms_norm(q, (wg, T), (wg, 1), self.o, D, 0, lw["post_attn_norm"], self.o, D, D, f.eps)
            prg.add(q, (T * D,), None, self.x, self.o, T * D)  # post_attn_residual
            grab(STAGE.post_attn_residual, layer, self.x, D, 0, D)
            prg.rms_norm(q, (wg, T), (wg, 1), self.x, D, 0, lw["ffn_norm"], self.h, D, D, f.eps)
            grab(STAGE.ffn_norm, layer, self.h, D, 0, D)
            if "experts" in lw:  # the mixture of experts (opencl_moe)
                moe_ffn(self, lw, layer, T, tr)
                self._ffn_end(lw, layer, T, f, grab, cap, c0)
                continue
            for slot, y_off in (("ffn_gate", F if f.ffn_swap else 0), ("ffn_up", 0 if f.ffn_swap else F)):
                w = lw[slot]
                prg.matvec(w[1], w[0], w[2], w[3], self.h, D, self.gu, 2 * F, y_off, T)
            grab(STAGE.ffn_gate, layer, self.gu, 2 * F, 0, F)
            grab(STAGE.ffn_up, layer, self.gu, 2 * F, F, F)
            act = self.spec.activation  # SwiGLU or GeGLU
            if tr is not None and tr.wants(STAGE.ffn_silu, layer):
                prg.swiglu(q, (F, T), None, self.gu, self.act, F, 1, act)
                grab(STAGE.ffn_silu, layer, self.act, F, 0, F)
            prg.swiglu(q, (F, T), None, self.gu, self.act, F, 0, act)
            grab(STAGE.ffn_swigl, layer, self.act, F, 0, F)
            w = lw["ffn_down"]
            prg.matvec(w[1], w[0], w[2], w[3], self.act, F, self.o, D, 0, T)
            self._ffn_end(lw, layer, T, f, grab, cap, c0)

    def _ffn_end(self, lw: dict, layer: int, T: int, f, grab, cap: np.ndarray, c0: int) -> None:
        """The FFN's end: stage ffn_out (o), the optional post-norm of o, x += o (post_ffn_residual), capture."""
        D, wg, q = self.config.n_embd, self.tuning.wg, self.queue
        grab(STAGE.ffn_out, layer, self.o, D, 0, D)
        if "post_ffn_norm" in lw:
            self.prg.rms_norm(q, (wg, T), (wg, 1), self.o, D, 0, lw["post_ffn_norm"], self.o, D, D, f.eps)
        self.prg.add(q, (T * D,), None, self.x, self.o, T * D)  # post_ffn_residual
        grab(STAGE.post_ffn_residual, layer, self.x, D, 0, D)
        if cap.shape[0] > 0:
            self._d2h(cap[layer, c0:c0 + T], self.x)

    def _logits(self, row0: int, n: int) -> None:
        """final_norm of rows row0..row0+n-1 of x, then lm_head (and the final soft-cap) into logits_buf
        (n, n_vocab)."""
        c, wg, hd = self.config, self.tuning.wg, self.head
        self.prg.rms_norm(self.queue, (wg, n), (wg, 1), self.x, c.n_embd, row0, self.output_norm, self.h, c.n_embd,
                          c.n_embd, c.rms_eps)
        self.prg.matvec(hd[1], hd[0], hd[2], hd[3], self.h, c.n_embd, self.logits_buf, c.n_vocab, 0, n)
        if self.spec.final_softcap > 0:  # logits = c * tanh(logits / c)
            self.prg.softcap(self.queue, (n * c.n_vocab,), None, self.logits_buf, np.float32(self.spec.final_softcap))

    def info(self) -> dict:
        """JSON-able description: device, tuning, byte counts and transfer counters."""
        return {"device": self.device_name, "is_gpu": self.is_gpu, "tuning": asdict(self.tuning),
                "unified_memory": self.device.unified_memory, "weight_buffers": len(self.weight_buffers),
                "weight_bytes": self.weight_bytes, "model_bytes": self.model_bytes, "aux_bytes": self.aux_bytes,
                "load_transfers": self.load_counters.to_dict(), "transfers": self.counters.to_dict(),
                "steps": self.steps, "fault": self.fault}
