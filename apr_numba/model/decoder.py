"""``Model``: a loaded decoder (config, packed weights, tokenizer, KV cache) and ``load()``.

The CPU backend runs :func:`apr_numba.backends.cpu_forward.forward` (Numba). State that persists between calls is
the KV cache and the number of cached positions (``n_past``), as llama.cpp's ``llama_context``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from apr_numba import runtime as _config
from apr_numba.arch.spec import ArchSpec
from apr_numba.errors import ArgumentError, ModelFormatError
from apr_numba.kernels.rope import spec_rope_tables
from apr_numba.model import plan
from apr_numba.model.hparams import ModelConfig, check_n_ctx
from apr_numba.model.kv_state import KVState, _record_tokens, cached_tokens  # noqa: F401 (re-exported)
from apr_numba.model.weights import ModelWeights, load_weights

DEFAULT_N_CTX = 4096
BACKENDS = ("auto", "cpu", "opencl")


@dataclass
class LoadStats:
    """Timings of ``load`` in seconds: open (parse or cache), tokenizer, pack, total."""

    open_s: float = 0.0
    tokenizer_s: float = 0.0
    pack_s: float = 0.0
    total_s: float = 0.0
    from_cache: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _open_source(path: Path, refuse: bool = True):
    """Open a model file by its content: GGUF, or .apr (when that reader is available). ``refuse``: refuse a
    GGUF this engine cannot run from its header first (:func:`apr_numba.model.support.refuse_unsupported`);
    ``inspect`` opens without it, to describe any well-formed file."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic == b"GGUF":
        from apr_numba.formats.gguf_file import GGUFFile
        from apr_numba.model.support import refuse_unsupported

        if refuse:
            refuse_unsupported(path)  # from the header alone, before the vocabulary is parsed (< 1 s)

        return GGUFFile(path)
    if magic == b"APR\x00":
        try:
            from apr_numba.formats.apr_file import AprFile  # added by the .apr format module
        except ImportError as exc:  # pragma: no cover - until the .apr reader exists
            raise ModelFormatError(f"{path}: .apr files are not supported by this build") from exc
        return AprFile(path)
    raise ModelFormatError(f"{path}: not a GGUF or .apr model file (magic {magic!r})")


class Model:
    """A decoder-only LLM ready to run.

    Attributes:
        path: model file. config: :class:`ModelConfig`. tokenizer: :class:`~apr_numba.model.tokenizer.Tokenizer`.
        weights: :class:`~apr_numba.model.weights.ModelWeights`. n_ctx: KV cache length (positions).
        backend: backend that runs ("cpu" or "opencl"). device: what it runs on (for OpenCL the device and
        platform). parity: the OpenCL parity gate's :class:`~apr_numba.backends.parity.ParityResult`, or None when no
        OpenCL path was tried. threads: kernel threads. n_past: positions in the KV cache.
        load_stats: :class:`LoadStats`.
    """

    def __init__(self, source, tokenizer, weights: ModelWeights, n_ctx: int, threads: int, stats: LoadStats):
        self.source = source
        self.path = Path(source.path)
        self.config: ModelConfig = weights.config
        self.tokenizer = tokenizer
        self.weights = weights
        self.n_ctx = n_ctx
        self.threads = threads
        self.backend = "cpu"
        self.device = "cpu (Numba)"
        self.parity = None
        self._opencl = None  # an OpenCLBackend once it passed the parity gate (see parity.open_opencl_path)
        self.load_stats = stats
        self.spec = weights.spec
        self._init_tables()

    def _init_tables(self) -> None:
        from apr_numba.backends.cpu_forward import cfg_tuple, fp_tuple

        c, spec = self.config, self.spec
        freqs = plan.rope_freqs(spec, self.source)
        self.rope_cos, self.rope_sin, self.rope_layer = spec_rope_tables(spec, self.n_ctx, freqs)
        self.state = self.new_state()
        self._cfg, self._fp = cfg_tuple(spec), fp_tuple(spec)
        self.layer_window = np.asarray(spec.layer_window, np.int64)
        self.no_capture = np.zeros((0, 0, 0), np.float32)  # 'no layer capture' for forward_into
        self.no_debug = self.debug_args()
        del c

    # -- tokenizer -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special tokens such as ``<|im_start|>`` matched whole)."""
        return self.tokenizer.encode(text)

    def decode(self, ids) -> str:
        """Text of token ids ``ids``."""
        return self.tokenizer.decode(list(ids))

    # -- forward ---------------------------------------------------------------------------
    def new_state(self, n_ctx: int | None = None, cpu: bool = False) -> KVState:
        """A fresh KV cache of n_ctx positions (default: the model's); np.zeros maps pages lazily.

        On the OpenCL backend the cache is in device memory (an ``opencl_backend.DeviceKVState``) unless
        ``cpu``; calls run on the path that owns their state, so a CPU state runs the Numba forward.
        """
        c, n = self.config, int(n_ctx or self.n_ctx)
        if not 1 <= n <= self.n_ctx:
            raise ArgumentError(f"state n_ctx must be in [1, {self.n_ctx}] (the model's RoPE table), got {n}")
        if self._opencl is not None and not cpu:
            return self._opencl.new_state(n)
        return KVState(np.zeros((c.n_layer, n, c.kv_dim), np.float32), np.zeros((c.n_layer, n, c.kv_dim), np.float32))

    def new_states(self, n_seq: int, n_ctx: int | None = None, cpu: bool = False) -> list[KVState]:
        """``n_seq`` fresh KV caches of n_ctx positions each that :meth:`eval_batch` decodes together.

        On the CPU they are rows of one stacked pair of float32 (n_seq, n_layer, n_ctx, kv_dim) arrays
        (``KVState.stack`` / ``index``); each state also works alone with :meth:`eval`. On the OpenCL
        backend (unless ``cpu``) they are independent device states, which :meth:`eval_batch` runs one
        after another.

        Raises:
            ArgumentError: n_seq < 1, or n_ctx outside [1, the model's n_ctx].
        """
        if int(n_seq) < 1:
            raise ArgumentError(f"n_seq must be >= 1, got {n_seq}")
        if self._opencl is not None and not cpu:
            return [self.new_state(n_ctx) for _ in range(int(n_seq))]
        one = self.new_state(n_ctx, cpu=True)  # checks n_ctx
        shape = (int(n_seq),) + one.k.shape
        stack = (np.zeros(shape, np.float32), np.zeros(shape, np.float32))  # pages mapped lazily
        return [KVState(stack[0][i], stack[1][i], stack=stack, index=i) for i in range(int(n_seq))]

    @property
    def n_past(self) -> int:
        """Positions held in the model's own KV cache."""
        return self.state.n_past

    @n_past.setter
    def n_past(self, value: int) -> None:
        self.state.n_past = int(value)

    @property
    def k_cache(self) -> np.ndarray:
        return self.state.k

    @property
    def v_cache(self) -> np.ndarray:
        return self.state.v

    def reset(self) -> None:
        """Forget the cached positions (the KV cache is overwritten lazily)."""
        self.state.n_past = 0

    def check_tokens(self, ids, state: KVState) -> np.ndarray:
        """``ids`` as int64 (T,), checked against the vocabulary and the room left in ``state``.

        Raises:
            ArgumentError: empty, an id outside [0, n_vocab), or more positions than the cache holds.
        """
        toks = np.asarray(ids, dtype=np.int64).reshape(-1)
        if toks.size == 0:
            raise ArgumentError("no tokens to evaluate (empty prompt)")
        if toks.min() < 0 or toks.max() >= self.config.n_vocab:
            raise ArgumentError(f"token id out of range [0, {self.config.n_vocab}): {int(toks.max())}")
        n_ctx = state.n_ctx
        if state.n_past + toks.size > n_ctx:
            raise ArgumentError(f"{state.n_past + toks.size} positions exceed the context length {n_ctx} "
                                f"(prompt too long; raise n_ctx up to {self.config.n_ctx_train})")
        return toks

    def eval(self, ids, n_logits: int = 1, capture_layers: bool = False, state: KVState | None = None,
             debug: tuple | None = None, mats=None):
        """Append ``ids`` to the sequence (prefill when len > 1, decode when 1) and return logits.

        The backend interface every tool uses (generate, trace, bisect, gates, bench, the dashboard).

        Args:
            ids: token ids (T,).
            n_logits: how many trailing positions to compute logits for (0..T).
            capture_layers: also return each block's output (post_ffn_residual), (n_layer, T, n_embd).
            state: the KV cache to extend (default: the model's own); a CPU :class:`KVState` runs the Numba
                forward, an OpenCL device state (:meth:`new_state` on the OpenCL path) the device forward.
            debug: the CPU forward's tracing / teaching-fault tuple (:meth:`debug_args`); CPU states only.
            mats: packed matrices replacing the model's (a weight teaching fault); CPU states only.

        Returns:
            logits float32 (n_logits, n_vocab), or (logits, layer_outputs) with capture_layers.

        Raises:
            ArgumentError: empty input, out-of-range ids, the context is full, or debug/mats with a device state.
        """
        state = self.state if state is None else state
        toks = self.check_tokens(ids, state)
        n_logits = max(0, min(int(n_logits), toks.size))
        logits = np.empty((n_logits, self.config.n_vocab), np.float32)
        cap = (np.empty((self.config.n_layer, toks.size, self.config.n_embd), np.float32)
               if capture_layers else self.no_capture)
        self.forward_into(toks, logits, cap, state, debug, mats)
        _record_tokens(state, toks)
        state.n_past += toks.size
        return (logits, cap) if capture_layers else logits

    def eval_batch(self, ids, states) -> np.ndarray:
        """One decode step of B sequences together: token ``ids[b]`` is appended to ``states[b]``.

        The batched forward (llama.cpp's ubatch of B tokens with their own ``pos`` and ``seq_id``;
        llama-server's parallel slots): the B tokens go through every matrix product as one (B, n) block, so
        the weights are read once for all of them, while RoPE, the KV store and attention use each token's
        own position and cache. Logits equal B separate :meth:`eval` calls up to float32 rounding of the
        products' accumulation order. Each state's ``n_past`` advances by 1 and its token record grows.

        Batched when every state is a CPU :class:`KVState` of one :meth:`new_states` stack; other states
        (OpenCL device states, CPU states made one by one) are evaluated one after another.

        Args:
            ids: B token ids, int (B,).
            states: B distinct KV states (list or tuple), one per token.

        Returns:
            logits float32 (B, n_vocab): row b the next-token logits of sequence b.

        Raises:
            ArgumentError: len(ids) != len(states), no states, a state given twice, an id outside
                [0, n_vocab), or a state whose context is full.
        """
        toks = np.asarray(ids, dtype=np.int64).reshape(-1)
        states = list(states)
        B = len(states)
        if B == 0 or toks.size != B:
            raise ArgumentError(f"eval_batch takes one token per state: {toks.size} ids for {B} states")
        if len({id(s) for s in states}) != B:
            raise ArgumentError("eval_batch: the same state appears twice (one token per sequence and step)")
        for t, st in zip(toks, states, strict=True):
            self.check_tokens(t[None], st)
        stack = states[0].stack if isinstance(states[0], KVState) else None
        if stack is None or any(not isinstance(s, KVState) or s.stack is not stack for s in states):
            return np.concatenate([self.eval(t[None], n_logits=1, state=st)
                                   for t, st in zip(toks, states, strict=True)])
        pos = np.array([s.n_past for s in states], np.int64)
        seq = np.array([s.index for s in states], np.int64)
        logits = np.empty((B, self.config.n_vocab), np.float32)
        from apr_numba.backends.cpu_decode import run_forward

        run_forward(toks, pos, seq, self._cfg, self._fp, self.weights.kernel_args(), self._rope_args(), stack[0],
                    stack[1], logits, self.no_capture, self.no_debug, self.no_debug)
        for t, st in zip(toks, states, strict=True):
            _record_tokens(st, t[None])
            st.n_past += 1
        return logits

    def debug_args(self, trace_off: np.ndarray | None = None, trace_buf: np.ndarray | None = None,
                   layer_fault: np.ndarray | None = None, rope_theta_alt: float | None = None,
                   eps_alt: float | None = None) -> tuple:
        """The forward's ``dbg`` tuple (tracing offsets/buffer, per-layer teaching faults); see forward.forward.

        Defaults trace nothing and inject nothing.
        """
        from apr_numba.arch.faults import N_FAULTS
        from apr_numba.arch.stages import N_STAGES

        c = self.config
        off = np.full((N_STAGES, c.n_layer), -1, np.int64) if trace_off is None else trace_off
        buf = np.zeros(0, np.float32) if trace_buf is None else trace_buf
        flt = np.zeros((c.n_layer, N_FAULTS), np.int64) if layer_fault is None else layer_fault
        if rope_theta_alt is None:
            cos_alt, sin_alt = self.rope_cos[0, :1], self.rope_sin[0, :1]
        else:
            # the wrong base with the file's rope_freqs divisors and linear scaling kept (as the reference does)
            alt = self.spec.with_features(layer_rope_base=(float(rope_theta_alt),) * c.n_layer)
            cos_alt, sin_alt, _ = spec_rope_tables(alt, self.n_ctx, plan.rope_freqs(self.spec, self.source))
            cos_alt, sin_alt = cos_alt[0], sin_alt[0]
        return (off, buf, flt, cos_alt, sin_alt, float(self.config.rms_eps if eps_alt is None else eps_alt))

    @property
    def opencl(self):
        """The :class:`~apr_numba.backends.opencl.OpenCLBackend` running this model, or None on the CPU."""
        return self._opencl

    def info(self) -> dict:
        """JSON-able description of what runs: backend, device, threads, architecture features, and on OpenCL
        the device's byte and transfer counters."""
        out = {"backend": self.backend, "device": self.device, "threads": self.threads, "arch": self.spec.arch,
               "features": sorted(self.spec.features), "n_ctx": self.n_ctx}
        if self._opencl is not None:
            out["opencl"] = self._opencl.info()
        return out

    def use_cpu(self) -> None:
        """Run every later call on the Numba CPU forward (drop the OpenCL path; a fresh CPU KV cache)."""
        self._opencl, self.parity = None, None
        self.backend, self.device = "cpu", "cpu (Numba)"
        self.state = self.new_state()

    def use_opencl(self, backend, parity) -> None:
        """Run every later call on ``backend`` (an OpenCLBackend that passed the gate ``parity``)."""
        self._opencl, self.parity = backend, parity
        self.backend, self.device = "opencl", backend.device_name
        self.state = backend.new_state(self.n_ctx)

    def forward_into(self, toks: np.ndarray, logits: np.ndarray, cap: np.ndarray, state: KVState, dbg=None,
                     mats=None) -> None:
        """The low-level step under :meth:`eval`: run checked ``toks`` (T,) int64 at ``state.n_past`` into
        preallocated ``logits`` float32 (n_out, n_vocab) and ``cap`` ((n_layer, T, n_embd) or (0, 0, 0)),
        WITHOUT advancing ``state.n_past`` (the caller does). ``dbg`` / ``mats`` as in :meth:`eval`.

        Raises:
            ArgumentError: ``dbg`` or ``mats`` with an OpenCL device state.
        """
        if not isinstance(state, KVState):  # a device KV cache: the OpenCL path
            if dbg is not None or mats is not None:
                raise ArgumentError("tracing and weight faults run on the CPU forward: pass a CPU state "
                                    "(model.new_state(n, cpu=True))")
            self._opencl.run(toks, logits, cap, state)
            return
        from apr_numba.backends.cpu_decode import run_forward

        T = toks.shape[0]  # one sequence (index 0 of a one-row stack) at positions n_past..n_past+T-1
        run_forward(toks, np.arange(state.n_past, state.n_past + T, dtype=np.int64), np.zeros(T, np.int64), self._cfg,
                    self._fp, self.weights.kernel_args(mats), self._rope_args(), state.k[None], state.v[None], logits,
                    cap, self.no_debug if dbg is None else dbg, self.no_debug)

    def warm_kernels(self, token: int = 0, both: bool = False) -> None:
        """Compile (or load from Numba's cache) the CPU path of this model's short calls with one token: the
        persistent-worker decode, or ``cpu_forward.forward`` where it does not apply (experts). ``both``
        also compiles the region-per-product forward (long prompts, tracing), as ``apr-numba warmup`` does.
        The KV cache is reset after."""
        from apr_numba.backends.cpu_forward import forward

        self.eval([token], n_logits=1)
        if both and isinstance(self.state, KVState):
            one = np.array([token], np.int64)
            forward(one, one * 0, one * 0, self._cfg, self._fp, self.weights.kernel_args(), self._rope_args(),
                    self.state.k[None], self.state.v[None], np.empty((1, self.config.n_vocab), np.float32),
                    self.no_capture, self.no_debug)
        self.reset()

    def _rope_args(self) -> tuple:
        """The forward's ``rope`` tuple: cos, sin tables, each layer's table and sliding window."""
        return self.rope_cos, self.rope_sin, self.rope_layer, self.layer_window

    def logits(self, ids) -> np.ndarray:
        """Logits float32 (len(ids), n_vocab) for every position, from a fresh cache.

        Raises:
            ArgumentError: empty input, out-of-range ids, longer than the context.
        """
        self.reset()
        out = self.eval(ids, n_logits=len(ids))
        self.reset()
        return out

    def close(self) -> None:
        """Drop the KV cache and release the source file's pages; the model is unusable afterwards."""
        self.state = None
        if hasattr(self.source, "release_pages"):
            self.source.release_pages()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({self.path.name}: {c.arch}, {c.n_layer} layers, d={c.n_embd}, heads {c.n_head}/"
                f"{c.n_head_kv}, vocab {c.n_vocab}, backend={self.backend}, threads={self.threads})")


def load(model, backend: str = "auto", threads: int | None = None, n_ctx: int | None = None,
         progress: bool = False, warmup: bool = True, device: int | None = None, no_gpu: bool = False,
         opencl_fault: str | None = None, activations: str | None = None) -> Model:
    """Load a model for inference.

    Args:
        model: a :class:`Model` (returned as is), a registry name (pulled if missing), or a path to a
            ``.gguf`` or ``.apr`` file.
        backend: "auto" (OpenCL on the first GPU device, if there is one and it passes the parity gate;
            else the CPU, silently), "cpu" (Numba; pyopencl is never imported), or "opencl" (OpenCL on any
            device type, PoCL included, behind the parity gate; on rejection one
            ``[apr-cpu-vs-gpu-output-parity-v1]`` line goes to stderr and the CPU runs).
        device: OpenCL device index (``apr_numba.backends.opencl_kernels.list_devices()`` order; default
            ``$APR_OPENCL_DEVICE``, else the first GPU, else with "opencl" the first device).
        no_gpu: force the CPU path (same as backend="cpu"): no OpenCL context, no parity line.
        opencl_fault: inject a kernel fault ("scale", or ``$APR_OPENCL_FAULT``) to test the parity gate.
        threads: kernel threads (default: all cores).
        n_ctx: KV cache length in positions (default min(4096, the model's training context)).
        progress: show a progress bar while packing weights.
        warmup: run one token through the forward so the kernels are compiled / loaded from Numba's
            cache before the first real call (its time is ``load_stats.extra['warmup_s']``).
        activations: CPU products with "f32" activations (exact; default: ``$APR_NUMBA_ACTIVATIONS``, else
            f32) or "int8" (quantized to blocks of 32 as llama.cpp does, AVX-512 VNNI dot products).

    Raises:
        ArgumentError: unknown model name, backend or activations, bad threads/n_ctx/device, no_gpu with
            "opencl".
        ModelFormatError: the file is missing, malformed, truncated, of an unsupported architecture, or an
            encoder directory (use :func:`apr_numba.load_encoder`; ``load`` always returns a decoder).
        PullError: a registry model could not be fetched.
    """
    if isinstance(model, Model):
        return model
    if backend not in BACKENDS:
        raise ArgumentError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if no_gpu:
        if backend == "opencl":
            raise ArgumentError("no_gpu (--no-gpu/--cpu) contradicts backend 'opencl'")
        backend = "cpu"
    from apr_numba.hub.pull import resolve_model
    from apr_numba.model.tokenizer import Tokenizer
    from apr_numba.quants.vnni_pack import activation_mode, packing_for

    try:
        activations = activation_mode(activations)
    except ValueError as e:
        raise ArgumentError(str(e)) from None

    _config.configure_threading()
    nthreads = _config.set_threads(threads)
    t0 = time.perf_counter()
    path = resolve_model(model)
    if path.is_dir():  # a HF safetensors directory: a BERT-family encoder, which has its own entry point
        raise ModelFormatError(f"{path}: this is an encoder model (a safetensors directory), not a decoder; use "
                               f"`apr-numba embed` or apr_numba.load_encoder() / apr_numba.embed()")
    src = _open_source(path)
    t1 = time.perf_counter()
    emb = src.tensors.get("token_embd.weight")
    spec = ArchSpec.from_metadata(src.metadata, str(path), src.tensors,
                                  n_vocab=emb.shape[0] if emb is not None else None)
    cfg = spec.hp
    ctx = check_n_ctx(n_ctx, cfg, DEFAULT_N_CTX, len(set(spec.layer_rope_base)))  # before any allocation for it
    tok_json = getattr(src, "tokenizer_json", None)
    tok = Tokenizer.from_json(tok_json) if tok_json else Tokenizer.from_metadata(src.metadata, str(path))
    tok.check_rows(cfg.n_vocab, str(path))
    if not getattr(src, "from_cache", True) and hasattr(src, "save_cache"):
        src.save_cache(tok.to_json())
    t2 = time.perf_counter()
    from apr_numba.kernels import precompile

    # a cold kernel cache: the products compile in a second process while this one packs and compiles the rest
    bg = precompile.start() if warmup else None
    with packing_for(activations):
        weights = load_weights(src, spec, progress=progress)
    if hasattr(src, "release_pages"):
        src.release_pages()  # the packed copy is what runs: don't keep the file's pages resident too
    t3 = time.perf_counter()
    stats = LoadStats(t1 - t0, t2 - t1, t3 - t2, 0.0, bool(getattr(src, "from_cache", False)))
    m = Model(src, tok, weights, ctx, nthreads, stats)
    if warmup:
        # Load (or compile) the Numba kernels now, so the first prompt's timings measure the forward.
        t4 = time.perf_counter()
        precompile.finish(bg)
        m.warm_kernels(tok.bos_id if tok.bos_id is not None else 0)
        stats.extra["warmup_s"] = time.perf_counter() - t4
    if backend != "cpu":
        from apr_numba.backends.parity import open_opencl_path

        t5 = time.perf_counter()
        open_opencl_path(m, backend, device, opencl_fault)
        stats.extra["opencl_s"] = time.perf_counter() - t5
    stats.total_s = time.perf_counter() - t0
    return m


def default_threads() -> int:
    """All cores Numba may use (``NUMBA_NUM_THREADS``, default: the CPU count)."""
    return int(os.environ.get("NUMBA_NUM_THREADS", os.cpu_count() or 1))
