"""Tensor tracing: save every intermediate tensor of a forward pass (aprender ``--save-tensor``).

One prefill pass of the prompt (positions 0..T-1, a fresh KV cache) is run on a backend and the
requested stages of the requested layers are captured::

    tr = apr_numba.debug.tracing("smollm2-135m", "The capital of France is", stages="all")
    tr.get("attn_softmax", layer=3)          # float32 (n_head, T, T)
    tr.save("trace-cpu")                     # trace-cpu/layer-3/attn_softmax.bin (APRT), ...

``apr-numba trace MODEL -p PROMPT --save-tensor STAGES|all --save-tensor-layers A..B --save-tensor-dir DIR
--backend cpu|opencl|reference [--inject FAULT]`` does the same from the shell.

Stages (:class:`SaveTensorStage`) are aprender's, in canonical compute order; each names its llama.cpp
graph tensor (the ``cb(cur, "name", il)`` names that ``llama-eval-callback`` / ``GGML_SCHED`` debug dumps
show) and its HF transformers counterpart, so traces line up with both tools.

Backends:

* ``cpu``: the compiled Numba forward fills a trace buffer through its ``dbg`` table (offsets per
  (stage, layer), -1 = not traced). The untraced path runs the same code with an all -1 table, so tracing
  costs one integer compare per stage when off (``bench/bench_trace_overhead.py``), and capture only
  copies: it never changes what the forward computes (tests/test_trace.py checks greedy tokens).
* ``reference``: the float64 NumPy oracle (:mod:`apr_numba.backends.reference`), rounded to float32 when saved.
* ``opencl``: the OpenCL backend through the same ``dbg`` tuple (``OpenCLBackend.run(..., dbg=)``,
  :mod:`apr_numba.backends.opencl_trace`); the weight fault q4k-scale runs on a backend built over the corrupted
  bytes (:class:`apr_numba.debug.faults.PatchedSource`).

Shapes: per-layer stages are (T, width); ``attn_scores`` / ``attn_softmax`` are (n_head, T, T) with zeros
above the diagonal (scores are scaled by 1/sqrt(head_dim) and shown before the mask: the causal part a
correct kernel computes; what the mask does shows in the softmax); ``lm_head`` is (T, n_vocab) (every
position); ``embedding`` belongs to layer 0 (``DIR/layer-0/embedding.bin``).

APRT file (aprender's): ``b"APRT"``, u32 layer (0xFFFFFFFF for whole-model stages), u32 element count n,
n float32, little-endian, NaN bits kept. A ``trace.json`` beside the files records the model, backend,
token ids, fault and shapes (APRT itself stores no shape).
"""

from __future__ import annotations

import ctypes
import inspect
import weakref

import numpy as np

from apr_numba.arch.stages import (
    ALIASES,
    DENSE_STAGES,
    MOE_STAGES,
    N_STAGES,
    STAGE_ID,
    STAGES,
    WHOLE_MODEL_STAGES,
    SaveTensorStage,  # noqa: F401 (defined in arch, part of tracing's API)
    stage_doc,  # noqa: F401
)
from apr_numba.debug.trace_files import (  # noqa: F401 (part of tracing's API)
    APRT_MAGIC,
    TRACE_JSON,
    TRACE_SCHEMA,
    WHOLE_MODEL_LAYER,
    Trace,
    chain_order,
    read_aprt,
    stage_path,
    write_aprt,
)
from apr_numba.errors import ArgumentError

BACKENDS = ("cpu", "opencl", "reference")




# ----------------------------------------------------------------------------------------- parsing


def parse_stages(spec, moe: bool = False, model_desc: str = "this model") -> list[str]:
    """Stage names in canonical order from a comma list (case-insensitive, trimmed), ``all``, or a list.

    ``layer_output`` is an alias of ``post_ffn_residual``. ``all`` means every stage the model has
    (moe_* only for MoE models).

    Raises:
        ArgumentError: empty item, unknown stage, or a moe_* stage on a dense model.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [str(s).strip().lower() for s in items]
    if not names or any(not n for n in names):
        raise ArgumentError(f"empty stage name in {spec!r} (expected a comma list of stages or 'all')")
    want = set()
    for n in names:
        if n == "all":
            want.update(STAGES if moe else DENSE_STAGES)
            continue
        n = ALIASES.get(n, n)
        if n not in STAGE_ID:
            raise ArgumentError(f"unknown stage {n!r} (choose from all, {', '.join(STAGES)}, "
                                f"{', '.join(ALIASES)})")
        if n in MOE_STAGES and not moe:
            raise ArgumentError(f"stage {n!r} exists only for mixture-of-experts models; {model_desc} is dense")
        want.add(n)
    return [s for s in STAGES if s in want]


def parse_layers(spec, n_layer: int) -> list[int]:
    """Layers from ``None``/``all``, ``N``, ``A..B`` (inclusive; ``A..=B`` too) or comma lists of those.

    Raises:
        ArgumentError: malformed, empty or out of range [0, n_layer).
    """
    if spec is None:
        return list(range(n_layer))
    if isinstance(spec, int):
        spec = str(spec)
    if not isinstance(spec, str):
        out = sorted({int(x) for x in spec})
    elif spec.strip().lower() == "all":
        return list(range(n_layer))
    else:
        out = set()
        for part in spec.split(","):
            part = part.strip()
            try:
                if ".." in part:
                    a, b = part.split("..", 1)
                    b = b.lstrip("=")
                    lo = int(a) if a.strip() else 0
                    hi = int(b) if b.strip() else n_layer - 1
                    if lo > hi:
                        raise ArgumentError(f"empty layer range {part!r}")
                    out.update(range(lo, hi + 1))
                else:
                    out.add(int(part))
            except ValueError:
                raise ArgumentError(f"bad layer spec {spec!r} (expected N, A..B or a comma list)") from None
        out = sorted(out)
    if not out:
        raise ArgumentError(f"no layers in {spec!r}")
    bad = [x for x in out if not 0 <= x < n_layer]
    if bad:
        raise ArgumentError(f"layer {bad[0]} out of range (model has layers 0..{n_layer - 1})")
    return out


# ------------------------------------------------------------------------------------------- capture


def stage_shape(config, stage: str, T: int, nk: int | None = None, moe: tuple[int, int] | None = None
                ) -> tuple[int, ...]:
    """Shape of a stage for T positions (nk keys for the attention stages, default T).

    ``moe``: (n_expert, n_expert_used) of a mixture-of-experts model, for the moe_* stages: moe_router
    (T, n_expert) logits, moe_router_indices (T, n_expert_used) ids, moe_ffn_out (T, n_embd).

    Raises:
        ArgumentError: a moe_* stage without ``moe``.
    """
    c = config
    if stage in MOE_STAGES and moe is not None:
        return (T, {"moe_router": moe[0], "moe_router_indices": moe[1]}.get(stage, c.n_embd))
    nk = T if nk is None else nk
    width = {"qkv_matmul": c.q_dim + 2 * c.kv_dim, "qkv_bias": c.q_dim + 2 * c.kv_dim, "q_post_rope": c.q_dim,
             "k_post_rope": c.kv_dim, "attention": c.q_dim, "ffn_gate": c.n_ff, "ffn_up": c.n_ff,
             "ffn_silu": c.n_ff, "ffn_swigl": c.n_ff, "lm_head": c.n_vocab}
    if stage in ("attn_scores", "attn_softmax"):
        return (c.n_head, T, nk)
    if stage in MOE_STAGES:
        raise ArgumentError(f"stage {stage!r} exists only for mixture-of-experts models")
    return (T, width.get(stage, c.n_embd))


def wanted_keys(stages: list[str], layers: list[int]) -> list[tuple[int | None, str]]:
    """(layer, stage) keys to capture: embedding only at layer 0, whole-model stages once."""
    keys = []
    for stage in stages:
        if stage in WHOLE_MODEL_STAGES:
            keys.append((None, stage))
        elif stage == "embedding":
            if 0 in layers:
                keys.append((0, stage))
        else:
            keys += [(la, stage) for la in layers]
    return chain_order(keys)


def trace_table(config, keys, T: int, pos0: int = 0, moe: tuple[int, int] | None = None):
    """The forward's capture table for ``keys``: (trace_off int64 (N_STAGES, n_layer), trace_buf float32,
    {key: (offset, shape)}). ``moe``: as for :func:`stage_shape`.

    attn_scores and attn_softmax are captured together by the attention kernel, so asking for one
    reserves room for both (only the one asked for is returned).
    """
    off = np.full((N_STAGES, config.n_layer), -1, np.int64)
    where, total = {}, 0
    kk = list(keys)
    for layer, stage in keys:
        if stage in ("attn_scores", "attn_softmax"):
            other = (layer, "attn_softmax" if stage == "attn_scores" else "attn_scores")
            if other not in kk:
                kk.append(other)
    for layer, stage in kk:
        shape = stage_shape(config, stage, T, pos0 + T, moe)
        off[STAGE_ID[stage], 0 if layer is None else layer] = total
        where[(layer, stage)] = (total, shape)
        total += int(np.prod(shape))
    buf = np.zeros(total, np.float32)
    return off, buf, {k: where[k] for k in keys}


def _tril_scores(tensors: dict) -> None:
    """Show attn_scores lower-triangular (what a causal kernel computes before masking)."""
    for (_, stage), a in tensors.items():
        if stage == "attn_scores":
            T, nk = a.shape[1:]
            a[:] = np.tril(a, k=nk - T)


def _fault_plan(model, inject):
    from apr_numba.debug.faults import plan_fault

    return plan_fault(inject, model.config, model.source) if inject is not None else None


def faulty_mats(model, plan):
    """A copy of ``model.weights.mats`` with the q4k-scale plan's matrices repacked from their corrupted
    bytes (apr_numba.debug.faults.corrupted_raw), or None when the plan has no weight fault."""
    if plan is None or not plan.matrices:
        return None
    from apr_numba.debug.faults import faulty_source
    from apr_numba.kernels.matmul import packed_list, packed_tuple
    from apr_numba.model.weights import LAYER_MATS, N_MATS
    from apr_numba.quants.layouts import decode_codes
    from apr_numba.quants.repack import pack

    src = faulty_source(model.source, plan)
    mats = list(model.weights.mats)
    for layer, slot in plan.matrices:
        name = f"blk.{layer}.{slot}.weight"
        t = src.tensors[name]
        mats[N_MATS * layer + LAYER_MATS.index(slot)] = packed_tuple(pack(decode_codes(t.ggml_type, src.data(name),
                                                                                       tuple(t.shape), name)))
    return packed_list(mats)


def _trace_buffers(model, keys, T: int, plan):
    """(trace_buf, where, dbg tuple, logits buffer) for capturing ``keys`` of a T-token prefill with ``plan``."""
    c = model.config
    sp = model.spec
    off, buf, where = trace_table(c, keys, T, moe=(sp.n_expert, sp.n_expert_used) if sp.n_expert else None)
    flags = plan.flag_table(c.n_layer) if plan is not None else None
    dbg = model.debug_args(off, buf, flags, plan.rope_theta_alt if plan else None, plan.eps_alt if plan else None)
    n_out = T if (None, "lm_head") in where else 0
    return buf, where, dbg, np.empty((n_out, c.n_vocab), np.float32)


def _trace_cpu(model, toks: np.ndarray, keys, plan) -> dict:
    T = toks.size
    buf, where, dbg, logits = _trace_buffers(model, keys, T, plan)
    state = model.new_state(min(model.n_ctx, max(T, 1)), cpu=True)  # the Numba forward, whatever model.backend
    model.forward_into(toks, logits, model.no_capture, state, dbg, faulty_mats(model, plan))
    out = {k: buf[o:o + int(np.prod(s))].reshape(s).copy() for k, (o, s) in where.items()}
    if (None, "lm_head") in out:
        out[(None, "lm_head")] = logits
    return out


_REFERENCE_MODELS: dict = {}


def reference_model(model):
    """The float64 :class:`~apr_numba.backends.reference.ReferenceModel` of a loaded Model, over its open source
    (no second parse of the file); cached for the last two models."""
    from apr_numba.backends.reference import ReferenceModel

    key = (str(model.path), id(model.source))
    if key not in _REFERENCE_MODELS:
        while len(_REFERENCE_MODELS) >= 2:
            _REFERENCE_MODELS.pop(next(iter(_REFERENCE_MODELS)))
        _REFERENCE_MODELS[key] = ReferenceModel.from_source(model.source, model.spec)
    return _REFERENCE_MODELS[key]


class single_thread_blas:  # noqa: N801 - used like a function: ``with single_thread_blas():``
    """Run NumPy's OpenBLAS on one thread inside the block (restored after).

    The reference multiplies a handful of rows by each weight matrix, and the stage diff takes dot
    products: memory-bound work where extra BLAS threads only spin; on 2 shared cores they made the
    reference ~10x slower. Found through the loaded library's ``*openblas*set_num_threads*`` symbol (as
    threadpoolctl does); a no-op when there is none.
    """

    def __init__(self):
        self.get = self.set = None
        self.saved = None
        try:
            with open("/proc/self/maps") as fh:
                libs = sorted({ln.split()[-1] for ln in fh if "openblas" in ln.lower() and ln.split()[-1][0] == "/"})
        except OSError:
            libs = []
        for path in libs:
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for prefix in ("scipy_openblas", "openblas"):
                for suffix in ("64_", "_64_", ""):
                    try:
                        self.get = getattr(lib, f"{prefix}_get_num_threads{suffix}")
                        self.set = getattr(lib, f"{prefix}_set_num_threads{suffix}")
                        return
                    except AttributeError:
                        continue

    def __enter__(self):
        if self.set is not None:
            self.saved = int(self.get())
            self.set(1)
        return self

    def __exit__(self, *exc):
        if self.set is not None and self.saved:
            self.set(self.saved)


def _trace_reference(model, toks: np.ndarray, keys, plan) -> dict:
    ref = reference_model(model)
    layers = sorted({la for la, _ in keys if la is not None})
    whole = any(la is None for la, _ in keys)
    with single_thread_blas():
        rec = ref.forward_traced(toks, layers, whole_model=whole, plan=plan)
    return {k: np.asarray(rec[k], np.float32) for k in keys}


_OPENCL_HOOK = ("the OpenCL backend does not capture stages: it needs OpenCLBackend.run(toks, logits, cap, "
                "state, dbg=...) taking the CPU forward's dbg tuple (trace_off, trace_buf, layer_fault, "
                "rope_cos_alt, rope_sin_alt, eps_alt) and filling trace_buf on the host after the pass")


def _opencl_backend_for(model, plan=None):
    """The model's OpenCL backend when it runs on one, else one made for tracing (kept on the model). With a
    q4k-scale plan, a new backend over the corrupted bytes (apr_numba.debug.faults.PatchedSource)."""
    from apr_numba.backends.opencl import OpenCLBackend

    if plan is not None and plan.matrices:
        from apr_numba.debug.faults import faulty_source

        return OpenCLBackend(faulty_source(model.source, plan), spec=model.spec, n_ctx=model.n_ctx)
    be = model.opencl or _TRACE_BACKENDS.get(model)
    if be is None:
        be = _TRACE_BACKENDS[model] = OpenCLBackend(model)
    return be


# OpenCL backends built for tracing a CPU model, one per model, dropped with the model.
_TRACE_BACKENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _trace_opencl(model, toks: np.ndarray, keys, plan) -> dict:
    """OpenCL capture through the backend's ``run(..., dbg=...)`` (the CPU forward's dbg contract)."""
    try:
        from apr_numba.backends.opencl import OpenCLBackend
    except Exception as exc:  # noqa: BLE001 - no pyopencl / no device: say so plainly
        raise ArgumentError(f"OpenCL backend unavailable: {exc}") from None
    if "dbg" not in inspect.signature(OpenCLBackend.run).parameters:
        raise ArgumentError(_OPENCL_HOOK)
    be = _opencl_backend_for(model, plan)
    T = toks.size
    buf, where, dbg, logits = _trace_buffers(model, keys, T, plan)
    be.run(toks, logits, model.no_capture, be.new_state(max(T, 1)), dbg=dbg)
    out = {k: buf[o:o + int(np.prod(s))].reshape(s).copy() for k, (o, s) in where.items()}
    if (None, "lm_head") in out:
        out[(None, "lm_head")] = logits
    return out


_CAPTURE = {"cpu": _trace_cpu, "reference": _trace_reference, "opencl": _trace_opencl}


def _as_model(model, n_ctx: int | None = None):
    from apr_numba.model.decoder import Model, load

    return model if isinstance(model, Model) else load(model, backend="cpu", n_ctx=n_ctx or 512)


def trace(model, prompt: str | None = None, *, tokens=None, stages="all", layers=None, backend: str = "cpu",
          inject: str | None = None, save_dir=None) -> Trace:
    """Run the prompt once (prefill, fresh cache) on ``backend`` and capture the chosen stages.

    Args:
        model: a loaded :class:`~apr_numba.model.decoder.Model`, a registry name or a model path.
        prompt: text (tokenized like ``apr-numba run``), or give ``tokens`` (ids) instead.
        stages: comma list / list of stage names, or "all" (see :func:`parse_stages`).
        layers: None/"all", "A..B" (inclusive), "N", or a list of layer numbers.
        backend: "cpu", "reference" or "opencl".
        inject: a teaching fault ``NAME[@LAYER]`` (apr_numba.debug.faults) injected on this backend.
        save_dir: also write the APRT files (and trace.json) there.

    Returns:
        :class:`Trace` with float32 arrays.

    Raises:
        ArgumentError: bad stages / layers / backend / fault, or the backend cannot capture.
    """
    if backend not in BACKENDS:
        raise ArgumentError(f"unknown trace backend {backend!r} (choose from {', '.join(BACKENDS)})")
    m = _as_model(model)
    c = m.config
    st = parse_stages(stages, moe=bool(m.spec.n_expert), model_desc=f"{m.path.name} ({c.arch})")
    if m.spec.n_expert:  # a MoE block has experts instead of the dense FFN stages
        have = set(m.spec.block_stages())
        if not (isinstance(stages, str) and stages.strip().lower() == "all"):
            bad = [s for s in st if s not in have]
            if bad:
                raise ArgumentError(f"stage {bad[0]!r} does not exist in {m.path.name} ({c.arch}): its FFN is a "
                                    "mixture of experts (moe_router, moe_router_indices, moe_ffn_out, ffn_out)")
        st = [s for s in st if s in have]
    lay = parse_layers(layers, c.n_layer)
    if "embedding" in st and 0 not in lay and not (isinstance(stages, str) and stages.strip().lower() == "all"):
        raise ArgumentError("the embedding stage is layer 0's input: include layer 0 in the traced layers")
    if tokens is None:
        if prompt is None:
            raise ArgumentError("no prompt: pass a prompt or tokens")
        from apr_numba.generation.generate import prompt_ids

        tokens = prompt_ids(m, prompt)
    toks = m.check_tokens(tokens, m.new_state(cpu=True))
    plan = _fault_plan(m, inject)
    keys = wanted_keys(st, lay)
    tensors = _CAPTURE[backend](m, toks, keys, plan)
    _tril_scores(tensors)
    tr = Trace(tensors, [int(t) for t in toks], backend, str(m.path), inject, list(plan.notes) if plan else [],
               c.n_layer)
    if save_dir is not None:
        tr.save(save_dir)
    return tr
