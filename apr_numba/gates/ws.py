"""WS-001..004: dispatch overhead, L1 behaviour, parallel-vs-serial equality and thread scaling of the CPU kernels.

Each function takes the :class:`~apr_numba.gates.context.GateContext` and keyword-only injection hooks for the
falsification tests (tests/test_gates.py); production calls pass none, and a hook left at None costs one
``is None`` test outside the timed work.
"""

from __future__ import annotations

import os
import statistics
import time
from types import SimpleNamespace

import numpy as np

from apr_numba.gates.core import Measured, NotApplicable

# --------------------------------------------------------------------------------------------- WS-001

MIN_DIM = 32  # hidden size, FFN size and head size of the minimal model
MIN_VOCAB = 64


def minimal_model(model, n_ctx: int = 64):
    """A decoder with ``model``'s structure and minimal dimensions, built in memory.

    Same: architecture, layer count, the 7 matrices per layer and the LM head with the same kernel family,
    code rows per block and offsets (so the same compiled forward and kernel branches run), QKV biases when
    the model has them, GQA ratio (n_head = n_rep query heads sharing 1 KV head), RoPE style and base.
    Minimal: hidden = FFN = head size = 32, vocabulary 64, an F32 embedding table, n_ctx positions.
    Weights are small random codes and scales (the values are irrelevant to timing).
    """

    from apr_numba.arch.spec import ArchSpec
    from apr_numba.kernels.matmul import packed_list, packed_tuple
    from apr_numba.model.decoder import LoadStats, Model
    from apr_numba.model.hparams import ModelConfig
    from apr_numba.model.weights import LAYER_MATS, ModelWeights
    from apr_numba.quants.blocks import FAMILY_U4V, FAMILY_U5V
    from apr_numba.quants.layouts import FAMILY_F32, FAMILY_U4, FAMILY_U5
    from apr_numba.quants.repack import LANES, PackedMatrix

    c = model.config
    cfg = ModelConfig(arch=c.arch, n_layer=c.n_layer, n_embd=MIN_DIM, n_head=c.n_rep, n_head_kv=1, n_ff=MIN_DIM,
                      n_vocab=MIN_VOCAB, n_ctx_train=n_ctx, rope_theta=c.rope_theta, rope_type=c.rope_type,
                      rms_eps=c.rms_eps, head_dim=MIN_DIM, name=f"minimal {c.name or c.arch}")
    D, F, qd, kvd = cfg.n_embd, cfg.n_ff, cfg.q_dim, cfg.kv_dim
    shapes = {"attn_q": (qd, D), "attn_k": (kvd, D), "attn_v": (kvd, D), "attn_output": (D, qd),
              "ffn_gate": (F, D), "ffn_up": (F, D), "ffn_down": (D, F)}
    rng = np.random.default_rng(0)

    def like(pm, rows, cols):
        G = -(-rows // LANES)
        if pm.family == FAMILY_F32:
            s = (rng.standard_normal((G, cols, LANES)) * 0.05).astype(np.float32)
            return PackedMatrix(FAMILY_F32, pm.ggml_type, rows, cols, 1, np.zeros((G, 0, 0, LANES), np.uint8), s,
                                np.zeros((G, 0, LANES), np.float32))
        k = pm.q.shape[2]
        vals = 2 * k if pm.family in (FAMILY_U4, FAMILY_U4V) else 32 if pm.family in (FAMILY_U5, FAMILY_U5V) else k
        nsub = cols // vals
        q = rng.integers(0, 256, (G, nsub) + pm.q.shape[2:], dtype=np.uint8)  # U5: (k, 2 * LANES) byte rows
        s = np.full((G, nsub, LANES), 1e-3, np.float32)
        m = np.full((G, nsub if pm.m.shape[1] else 0, LANES), 1e-3, np.float32)
        return PackedMatrix(pm.family, pm.ggml_type, rows, cols, pm.group, q, s, m)

    src = model.weights.packed
    packed = []
    for layer in range(c.n_layer):
        for i, slot in enumerate(LAYER_MATS):
            packed.append(like(src[7 * layer + i], *shapes[slot]))
    packed.append(like(src[7 * c.n_layer], cfg.n_vocab, D))
    mats = packed_list(packed_tuple(pm) for pm in packed)
    L = c.n_layer
    embd = (rng.standard_normal((cfg.n_vocab, D)) * 0.1).astype(np.float32)
    w = ModelWeights(cfg, mats, packed, np.ones((L, D), np.float32), np.ones((L, D), np.float32),
                     np.ones(D, np.float32), (rng.standard_normal((L, qd + 2 * kvd)) * 0.01).astype(np.float32),
                     model.weights.has_bias, embd.view(np.uint8).reshape(cfg.n_vocab, -1), 0, False, {},
                     sum(p.nbytes for p in packed), q_norm=np.zeros((L, 0), np.float32),
                     k_norm=np.zeros((L, 0), np.float32), post_attn_norm=np.zeros((L, 0), np.float32),
                     post_ffn_norm=np.zeros((L, 0), np.float32),
                     spec=ArchSpec(hp=cfg, arch=c.arch, rope_type=c.rope_type, qkv_bias=model.weights.has_bias,
                                   tied_head=False))
    src_ns = SimpleNamespace(path=f"minimal-{model.path.name}")
    return Model(src_ns, None, w, n_ctx, model.threads, LoadStats())


def decode_step_times(model, steps: int = 48, rounds: int = 3, step_hook=None) -> list[float]:
    """Wall seconds of each decode step ``model.eval([tok])`` (the public API, one compiled forward per step),
    ``rounds`` x ``steps`` steps from a 1-token prompt on a private KV cache. ``step_hook()`` (injection for the
    falsification test) runs inside each timed step."""
    state = model.new_state(min(model.n_ctx, steps + 1))
    times = []
    for _ in range(rounds):
        state.n_past = 0
        model.eval([1], state=state)
        for _ in range(steps):
            t0 = time.perf_counter()
            model.eval([1], state=state)
            if step_hook is not None:
                step_hook()
            times.append(time.perf_counter() - t0)
    return times


def ws_001(ctx, *, step_hook=None) -> Measured:
    """Dispatch overhead per decode step, isolated as the median wall time of a decode step
    (``Model.eval([tok])``) of :func:`minimal_model`: the same Python entry, argument checks, allocation of the
    logits, unboxing of the same typed list of 7 x n_layer + 1 packed matrices and the same 4 x n_layer + 1
    parallel regions (``matmul3``; TBB/OpenMP fork-join) as the real model, with the arithmetic shrunk to
    a few thousand multiply-adds per layer (estimated from the model's MACs at the measured kernel rate and
    reported). So the value is dispatch plus a negligible, stated compute remainder: an upper bound. Since the
    persistent-worker decode (backends/cpu_decode.py), a call this small runs on one worker
    (``n_workers_for``); the real model's cross-core synchronisation is in its decode speed (bench/workers.py).
    """
    m = ctx.model
    steps = 96 if ctx.slow else 48
    mini = minimal_model(m, n_ctx=steps + 8)
    times = decode_step_times(mini, steps=steps, rounds=3, step_hook=step_hook)
    med = statistics.median(times)
    macs = sum(pm.rows * pm.cols for pm in mini.weights.packed)
    from apr_numba import runtime as _config

    return Measured(med * 1e3, detail=(
        f"median of {len(times)} decode steps of a {m.config.n_layer}-layer {m.config.arch} model with the same "
        f"kernels at hidden 32 ({macs} MACs/step); p10 {np.percentile(times, 10) * 1e3:.3f} ms, p90 "
        f"{np.percentile(times, 90) * 1e3:.3f} ms; {mini.threads} threads ({_config.threading_layer()})"),
        data={"median_ms": med * 1e3, "p10_ms": float(np.percentile(times, 10) * 1e3),
              "p90_ms": float(np.percentile(times, 90) * 1e3), "steps": len(times), "macs_per_step": macs,
              "parallel_regions_per_step": 4 * m.config.n_layer + 1, "threads": mini.threads})


# --------------------------------------------------------------------------------------------- WS-002

def ws_002(ctx, *, kernels=None, profile=None, geometry=None) -> Measured:
    """L1D load-miss-rate proxy of one decode step's matmuls (:func:`apr_numba.gates.l1proxy.model_proxy`: every
    packed matrix of the model, streamed once, load-weighted), and the largest tile footprint. The proxy's
    code profile is read from this machine's compiled kernel and the cache geometry from sysfs.

    Injection: ``kernels`` (matrices / KernelShapes instead of the model's), ``profile``, ``geometry``.
    """
    from apr_numba.gates.l1proxy import code_profile, l1d_geometry, model_proxy

    mats = kernels if kernels is not None else ctx.model.weights.packed
    geo = geometry or l1d_geometry()
    prof = profile or code_profile()
    r = model_proxy(mats, geo, prof)
    worst = max(r.details["per_kernel"].items(), key=lambda kv: kv[1]["load_miss_rate"])
    return Measured(r.miss_rate, also={"footprint_bytes": float(r.footprint_bytes)}, detail=(
        f"{r.details['load_misses']:.0f} modelled L1D load misses / {r.details['loads']:.0f} loads per decode "
        f"step (no prefetch); L1D {geo.size // 1024} KiB {geo.ways}-way {geo.line} B; {prof['vector_bytes']} B "
        f"vectors ({prof['source']}); worst {worst[0]} {worst[1]['load_miss_rate']:.2%}; footprint "
        f"{r.footprint_bytes} B; loads+stores rate {r.details['miss_rate_all']:.2%}"),
        data={"per_kernel": r.details["per_kernel"], "loads": r.details["loads"],
              "load_misses": r.details["load_misses"], "miss_rate_all": r.details["miss_rate_all"],
              "vector_bytes": prof["vector_bytes"], "code_profile": prof["source"],
              "l1d": {"size": geo.size, "line": geo.line, "ways": geo.ways, "source": geo.source}})


# --------------------------------------------------------------------------------------------- WS-003

WS003_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K")
_F16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2),
               "Q6_K": (208,)}


def random_blocks(type_name: str, rows: int, cols: int, rng) -> np.ndarray:
    """Raw GGML bytes (rows, row_bytes) of a random matrix of ``type_name``: random codes / scale bytes with
    every float16 field (d, m, dmin) set to a finite value in [1e-3, 2e-2]."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    t = GGMLQuantizationType[type_name]
    if type_name == "F32":
        return rng.standard_normal((rows, cols)).astype("<f4").view(np.uint8)
    if type_name == "F16":
        return rng.standard_normal((rows, cols)).astype("<f2").view(np.uint8)
    if type_name == "BF16":
        f = rng.standard_normal((rows, cols)).astype("<f4").view("<u4")
        return (f >> 16).astype("<u2").view(np.uint8)
    bs, ts = GGML_QUANT_SIZES[t]
    nb = rows * cols // bs
    raw = rng.integers(0, 256, (nb, ts), dtype=np.uint8)
    for off in _F16_FIELDS[type_name]:
        raw[:, off:off + 2] = rng.uniform(1e-3, 2e-2, nb).astype("<f2").view(np.uint8).reshape(nb, 2)
    return raw.reshape(rows, -1)


def parallel_product(out, x, w) -> None:
    """The production parallel matvec: ``matmul3`` (prange over row groups) for T = 1."""
    from apr_numba.kernels.matmul import matmul3

    matmul3(out, x, w, w, w, 1)


def ws_003(ctx, *, kernel=None, rows: int = 200, cols: int = 512) -> Measured:
    """For every quant type: a random matrix (rows x cols, rows not a multiple of 64 so the padded last group
    runs) decoded and packed as at load, x random; the parallel kernel (``matmul3``, all threads) against the
    serial reference (:func:`apr_numba.gates.serial.serial_matvec`: the same row-group arithmetic in a plain
    loop). Relative difference per element: |par - ser| / max(|ser|, 1e-6 max|ser|) (the floor keeps an output
    near 0 from dividing by ~0); the value is the largest over all types.

    Injection: ``kernel(out (1, rows), x (1, cols), w)`` replaces the parallel kernel.
    """
    from gguf import GGMLQuantizationType

    from apr_numba.gates.serial import serial_matvec
    from apr_numba.kernels.matmul import packed_tuple
    from apr_numba.quants.layouts import decode_codes
    from apr_numba.quants.repack import pack
    from apr_numba.runtime import threading_layer

    kern = kernel or parallel_product
    rng = np.random.default_rng(3)
    per = {}
    for name in WS003_TYPES:
        raw = random_blocks(name, rows, cols, rng)
        pm = pack(decode_codes(int(GGMLQuantizationType[name]), raw, (rows, cols), name))
        w = packed_tuple(pm)
        x = rng.standard_normal(cols).astype(np.float32)
        ref = np.zeros(rows, np.float32)
        serial_matvec(ref, x, w, 1)
        par = np.zeros((1, rows), np.float32)
        kern(par, x[None, :], w)
        floor = 1e-6 * float(np.abs(ref).max())
        rel = np.abs(par[0].astype(np.float64) - ref) / np.maximum(np.abs(ref).astype(np.float64), floor)
        per[name] = float(rel.max()) if np.isfinite(rel).all() else float("inf")
    worst = max(per, key=per.get)
    import numba

    return Measured(max(per.values()), detail=(
        f"{len(per)} quant types, {rows}x{cols}; parallel matmul3 on {numba.get_num_threads()} threads "
        f"({threading_layer()}) vs serial loop; worst {worst} {per[worst]:.3g}"), data={"per_type": per})


# --------------------------------------------------------------------------------------------- WS-004

def decode_rate(model, threads: int, n_tokens: int) -> float:
    """Decode tok/s of ``model`` with ``threads`` kernel threads: n_tokens steps after a 1-token prompt."""
    from apr_numba import runtime as _config

    _config.set_threads(threads)
    state = model.new_state(min(model.n_ctx, n_tokens + 1))
    model.eval([1], state=state)
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        model.eval([1], state=state)
    return n_tokens / (time.perf_counter() - t0)


def scaling_threads() -> int:
    """N: the largest thread count <= 4 this machine (and Numba) has."""
    import numba

    return max(1, min(4, numba.config.NUMBA_NUM_THREADS, os.cpu_count() or 1))


def ws_004(ctx, *, workload=None, serialize: bool = False, n: int | None = None) -> Measured:
    """Thread scaling of decoding: tok/s with N threads vs 1 thread, N = :func:`scaling_threads`, on the model
    (16 tokens per run, 3 interleaved runs per count, best run kept; 48 tokens x 5 with slow). Value: parallel
    efficiency rate_N / (N rate_1); the rule tok/s_N >= 0.875 N tok/s_1 is efficiency >= 0.875.

    Injection: ``workload(threads) -> rate`` replaces the decode measurement; ``serialize`` runs the N-thread
    measurement on 1 thread (a serialization regression); ``n`` forces N.
    """
    from apr_numba import runtime as _config

    N = n or scaling_threads()
    if N < 2:
        raise NotApplicable(f"needs >= 2 cores for a scaling measurement, this machine has {os.cpu_count()}")
    if workload is None:
        model = ctx.model
        toks, reps = (48, 5) if ctx.slow else (16, 3)

        def workload(threads):
            return decode_rate(model, threads, toks)
    else:
        toks, reps = 0, 3
    before = None
    try:
        import numba

        before = numba.get_num_threads()
        r1, rn = [], []
        for _ in range(reps):
            r1.append(workload(1))
            rn.append(workload(1 if serialize else N))
    finally:
        if before is not None:
            _config.set_threads(before)
    best1, bestn = max(r1), max(rn)
    eff = bestn / (N * best1)
    return Measured(eff, detail=(
        f"N={N}: {bestn:.2f} tok/s vs 1 thread {best1:.2f} tok/s = {bestn / best1:.2f}x (needs >= {0.875 * N:.2f}x); "
        f"threading layer {_config.threading_layer()}; best of {reps} runs" + (f" of {toks} tokens" if toks else "")),
        data={"N": N, "rate_1": best1, "rate_n": bestn, "speedup": bestn / best1, "runs_1": r1, "runs_n": rn,
              "threading_layer": _config.threading_layer(), "machine_cores": os.cpu_count()})
