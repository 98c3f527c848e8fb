"""CPU-GPU-001..006 and GWR-001..005 against the OpenCL backend (:mod:`apr_numba.backends.opencl`).

The device path is measured directly (``GateContext.opencl_backend``: an ``OpenCLBackend`` of the model built
without the parity gate, so a path the gate would reject is still measured and FAILs). On a machine without
pyopencl or an OpenCL device every gate here is NOT_APPLICABLE with that reason; in CI they run on PoCL's
CPU device. Injection hooks: ``backend=`` (a regression build of the backend) and a few gate-specific ones.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

from apr_numba.gates.core import Measured, NotApplicable

PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time")
GWR004_TOKENS = 20

# GWR-002 floors: decode tok/s a device class must reach on aprender's reference model (a 1.5B Q4_K GGUF,
# REF_MODEL_BYTES of tensors); scaled to a model by REF_MODEL_BYTES / model bytes (decoding is bandwidth
# bound: one pass over the weights per token). aprender sets the RTX 4090 floor; the others are derived
# from it by memory bandwidth (GB/s) and are marked so. CPU OpenCL devices (PoCL) have no floor.
REF_MODEL_BYTES = 986e6  # Qwen2.5-1.5B-Instruct Q4_K_M tensors
DEVICE_FLOORS = {
    "rtx 4090": (180.0, "aprender GWR-002"),
    "rtx 4080": (180.0 * 717 / 1008, "derived: 717/1008 GB/s of the 4090"),
    "rtx 3090": (180.0 * 936 / 1008, "derived: 936/1008 GB/s of the 4090"),
    "a100": (180.0 * 1555 / 1008, "derived: 1555/1008 GB/s of the 4090"),
    "h100": (180.0 * 2000 / 1008, "derived: 2000 (PCIe) / 1008 GB/s of the 4090"),
    "radeon rx 7900 xtx": (180.0 * 960 / 1008, "derived: 960/1008 GB/s of the 4090"),
}
ACTIVATION_BUFFERS = frozenset({"x", "h", "o", "qkv", "att", "gu", "act", "logits_buf", "scores", "ids_buf",
                                "argmax_buf"})
AUX_BUFFERS = frozenset({"rope_cos", "rope_sin"})


def _backend(ctx, backend):
    return backend if backend is not None else ctx.opencl_backend


def _prompt_ids(model) -> list[list[int]]:
    from apr_numba.generation.generate import prompt_ids

    return [prompt_ids(model, p) for p in PROMPTS]


def _cosine(a, b) -> float:
    from apr_numba.backends.parity import cosine

    return cosine(a, b)


def _last_logits(ctx, backend) -> list[tuple[np.ndarray, np.ndarray]]:
    """(CPU, device) last-position logits of each prompt, fresh caches; cached per backend in ctx."""
    key = ("last_logits", id(backend))
    if key not in ctx.cache:
        m = ctx.model
        out = []
        for ids in _prompt_ids(m):
            cpu = m.eval(ids, n_logits=1, state=m.new_state(len(ids)))[-1].copy()
            dev = backend.eval(ids, 1, backend.new_state(len(ids)))[-1].copy()
            out.append((cpu, dev))
        ctx.cache[key] = out
    return ctx.cache[key]


def cpu_gpu_001(ctx, *, backend=None) -> Measured:
    """First greedy token (argmax of the last-position logits) of 3 prompts on the OpenCL device vs the CPU, each
    a prefill from a fresh cache. Value: prompts whose argmax differs."""
    be = _backend(ctx, backend)
    pairs = _last_logits(ctx, be)
    diff = [i for i, (c, d) in enumerate(pairs) if int(np.argmax(c)) != int(np.argmax(d))]
    return Measured(float(len(diff)), detail=f"{len(pairs)} prompts on {be.device_name}; argmax differs on "
                    f"{len(diff)}", data={"cpu": [int(np.argmax(c)) for c, _ in pairs],
                                          "device": [int(np.argmax(d)) for _, d in pairs]})


def cpu_gpu_002(ctx, *, backend=None) -> Measured:
    """Cosine (float64) of the last-position logits, OpenCL vs CPU, of the same 3 prompts; the value is the
    smallest."""
    be = _backend(ctx, backend)
    cos = [_cosine(d, c) for c, d in _last_logits(ctx, be)]
    v = min(cos) if all(math.isfinite(x) for x in cos) else float("nan")
    return Measured(v, detail=f"{len(cos)} prompts on {be.device_name}; cosines " + ", ".join(f"{x:.6f}" for x in cos),
                    data={"cosines": cos})


def _tag_lines(text: str) -> list[str]:
    from apr_numba.backends.parity import TAG

    return [ln for ln in text.splitlines() if ln.startswith(TAG)]


def _cli(args: list[str], env_extra: dict, preamble: str = "", timeout: float = 600.0) -> tuple[int, str, str]:
    """Run ``apr_numba.cli.main.main(args)`` in a fresh interpreter; returns (rc, stdout, stderr). The child reports,
    on its last stderr line, whether pyopencl was imported."""
    code = (f"import sys, json\n{preamble}\nfrom apr_numba.cli.main import main\nrc = main({args!r})\n"
            "sys.stdout.flush()\nsys.stderr.write('\\n@@GATE ' + json.dumps({'rc': rc, 'pyopencl': 'pyopencl' in "
            "sys.modules}) + '\\n')\nsys.exit(rc)\n")
    env = dict(os.environ)
    for k in ("APR_OPENCL_DEVICE", "APR_OPENCL_FAULT", "APR_OPENCL_PARITY_STEPS"):
        env.pop(k, None)
    env.update(env_extra)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def _gate_line(stderr: str) -> dict:
    for ln in reversed(stderr.splitlines()):
        if ln.startswith("@@GATE "):
            return json.loads(ln[7:])
    return {}


def cpu_gpu_003(ctx, *, silence: bool = False) -> Measured:
    """The load-time switch (:func:`apr_numba.backends.parity.open_opencl_path`, what ``load(backend="opencl")`` and the
    CLI call) run twice on copies of the CPU model, stderr captured, no verbosity anywhere:

    * clean kernels: the parity gate must have run (a ParityResult with its probe steps);
    * kernels with the "scale" fault: exactly one ``[apr-cpu-vs-gpu-output-parity-v1] ... path rejected,
      attempting fallback: ...`` line, the model left on the CPU with a failed ParityResult, and its answer
      equal to the CPU's (fallback).

    With ``ctx.slow`` also the real command line in a fresh process (``apr-numba run MODEL --backend opencl``
    with ``APR_OPENCL_FAULT=scale``, no -v): one rejection line on stderr, exit 0, backend cpu. Value: failed
    checks. Injection: ``silence`` makes the rejection report a no-op (a regression that logs it only with
    --verbose)."""
    from apr_numba.backends import parity

    bad = []
    clean = ctx.open_gated()
    res = clean.parity
    if res is None or not (res.cosines or res.reason):
        bad.append("clean load: the parity gate did not run")
    elif not res.passed and len(_tag_lines(clean._gate_stderr)) != 1:
        bad.append("clean load rejected without exactly one rejection line")
    orig = parity.report_rejection
    if silence:
        parity.report_rejection = lambda *a, **k: None
    try:
        faulty = ctx.open_gated(fault="scale")
    finally:
        parity.report_rejection = orig
    lines = _tag_lines(faulty._gate_stderr)
    if len(lines) != 1 or "path rejected, attempting fallback:" not in (lines[0] if lines else ""):
        bad.append(f"faulty kernels: {len(lines)} rejection lines on stderr (want 1)")
    if faulty.backend != "cpu" or faulty.opencl is not None:
        bad.append(f"faulty kernels: the model runs on {faulty.backend}")
    if faulty.parity is None or faulty.parity.passed:
        bad.append("faulty kernels: the parity result says passed")
    ids = _prompt_ids(ctx.model)[0]
    ref = ctx.model.eval(ids, state=ctx.model.new_state(len(ids)))[-1]
    got = faulty.eval(ids, state=faulty.new_state(len(ids)))[-1]
    if not np.array_equal(ref, got):
        bad.append("faulty kernels: the fallback answer differs from the CPU's")
    cli = None
    if ctx.slow:
        rc, out, err = _cli(["run", str(ctx.model_path), "-p", "Hello", "-n", "1", "--n-ctx", "64", "--backend",
                             "opencl", "--json"], {"APR_OPENCL_FAULT": "scale"})
        n = len(_tag_lines(err))
        try:
            backend = json.loads(out.strip().splitlines()[-1]).get("backend")
        except (ValueError, IndexError):
            backend = None
        cli = {"rc": rc, "tag_lines": n, "backend": backend}
        if rc != 0 or n != 1 or backend != "cpu":
            bad.append(f"CLI: rc {rc}, {n} rejection lines, backend {backend}")
    why = (faulty.parity.reason if faulty.parity else "")[:120]
    return Measured(float(len(bad)), detail=(
        f"gate ran at load ({'passed' if res and res.passed else 'rejected'}); faulty kernels -> {len(lines)} line(s), "
        f"backend {faulty.backend} ({why})" + (f"; CLI {cli}" if cli else "") + (f"; {'; '.join(bad)}" if bad else "")),
        data={"clean": res.to_dict() if res else None, "faulty_lines": lines, "cli": cli, "failed": bad})


_IGNORE_NO_GPU = """
import apr_numba.model.decoder as _M
_orig_load = _M.load
def _load(*a, **k):
    k["no_gpu"] = False
    k["backend"] = "opencl"
    return _orig_load(*a, **k)
_M.load = _load
"""


def cpu_gpu_004(ctx, *, ignore_no_gpu: bool = False) -> Measured:
    """``apr-numba run MODEL -p Hello -n 2 --no-gpu --json`` in a fresh interpreter with ``APR_OPENCL_FAULT=scale``
    in its environment (so any OpenCL path that ran would be rejected and print the parity line). Checks: exit 0;
    ``pyopencl`` never imported; no parity line and no stderr line mentioning OpenCL / GPU; the JSON says backend
    cpu with no parity result. Value: failed checks.

    Injection: ``ignore_no_gpu`` patches ``load`` in the child to drop ``no_gpu`` and take the OpenCL backend
    (a regression where the flag is not honoured)."""
    ctx.model  # noqa: B018 - decoder gates only (NotApplicable for an encoder)
    rc, out, err = _cli(["run", str(ctx.model_path), "-p", "Hello", "-n", "2", "--n-ctx", "64", "--no-gpu", "--json"],
                        {"APR_OPENCL_FAULT": "scale"}, _IGNORE_NO_GPU if ignore_no_gpu else "")
    g = _gate_line(err)
    bad = []
    if rc != 0:
        bad.append(f"exit code {rc}")
    if g.get("pyopencl", True):
        bad.append("pyopencl was imported")
    tags = _tag_lines(err)
    if tags:
        bad.append(f"{len(tags)} parity line(s)")
    gpu_lines = [ln for ln in err.splitlines() if not ln.startswith("@@GATE") and
                 any(w in ln.lower() for w in ("opencl", "gpu", "pocl"))]
    if gpu_lines and not tags:
        bad.append(f"{len(gpu_lines)} GPU log line(s)")
    try:
        js = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        js = {}
    if js.get("backend") != "cpu" or js.get("parity") is not None:
        bad.append(f"backend {js.get('backend')!r}, parity {'set' if js.get('parity') else 'none'}")
    return Measured(float(len(bad)), detail=("`apr-numba run --no-gpu`: " + ("; ".join(bad) if bad else
                    f"exit 0, no pyopencl, no GPU lines, backend {js.get('backend')}")),
                    data={"rc": rc, "failed": bad, "stderr_tail": err[-600:]})


def _kv_fingerprint(state) -> tuple[int, str]:
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(state.k).data)
    h.update(np.ascontiguousarray(state.v).data)
    return state.n_past, h.hexdigest()


def cpu_gpu_005(ctx, *, backend=None, steps: int | None = None) -> Measured:
    """The production probe :func:`apr_numba.backends.parity.run_parity_gate` (N decode steps, one token each, from BOS,
    both sides advanced by the CPU argmax, each on its own KV cache) against the OpenCL backend. Value: the smallest
    per-step cosine. ``also.probe_violations``: the probe stopped before N steps; ``parity_steps`` does not default
    to 3 or does not accept exactly 1..16; the model's own KV cache changed during the probe.

    Injection: ``backend``; ``steps`` (N, default ``parity_steps()``)."""
    from apr_numba.backends.parity import DEFAULT_STEPS, MAX_STEPS, parity_steps, run_parity_gate
    from apr_numba.errors import ArgumentError

    be = _backend(ctx, backend)
    m = ctx.model
    viol = []
    saved = {k: os.environ.pop(k) for k in ("APR_OPENCL_PARITY_STEPS",) if k in os.environ}
    try:
        if parity_steps() != DEFAULT_STEPS or DEFAULT_STEPS != 3:
            viol.append(f"default steps {parity_steps()} != 3")
        for n in (1, MAX_STEPS):
            if parity_steps(n) != n:
                viol.append(f"steps {n} not accepted")
        for n in (0, MAX_STEPS + 1):
            try:
                parity_steps(n)
                viol.append(f"steps {n} accepted")
            except ArgumentError:
                pass
    finally:
        os.environ.update(saved)
    if MAX_STEPS != 16:
        viol.append(f"MAX_STEPS {MAX_STEPS} != 16")
    n = steps or parity_steps()
    before = _kv_fingerprint(m.state)
    bos = m.tokenizer.bos_id if m.tokenizer.bos_id is not None else 0
    res = run_parity_gate(m, be, bos, n)
    if _kv_fingerprint(m.state) != before:
        viol.append("the probe changed the model's KV cache")
    if len(res.cosines) < n or not res.passed:
        viol.append(f"probe stopped: {res.reason}")
    v = min(res.cosines) if res.cosines else float("nan")
    return Measured(v, also={"probe_violations": float(len(viol))}, detail=(
        f"{len(res.cosines)}/{n} steps on {be.device_name}; cosines " + ", ".join(f"{c:.6f}" for c in res.cosines)
        + (f"; {'; '.join(viol)}" if viol else "")), data={"parity": res.to_dict(), "violations": viol})


def cpu_gpu_006(ctx, *, backend=None, steps: int | None = None) -> Measured:
    """The multi-step probe on the device's second path, the batched (prefill) kernels: at step k the whole
    sequence so far (a prompt of several tokens plus k - 1 tokens) is one device prefill from a fresh cache
    (matrix-matrix kernels, T > 1 tokens at once) and its last-position logits are compared with the CPU's
    incremental decode at that position; the next token is the CPU's argmax. N = ``parity_steps()`` (3).
    Value: the smallest cosine."""
    from apr_numba.backends.parity import parity_steps

    be = _backend(ctx, backend)
    m = ctx.model
    n = steps or parity_steps()
    seq = list(_prompt_ids(m)[0])
    st = m.new_state(len(seq) + n)
    cpu = m.eval(seq, n_logits=1, state=st)[-1]
    cos, lens = [], []
    for _ in range(n):
        dev = be.eval(seq, 1, be.new_state(len(seq)))[-1]
        cos.append(_cosine(dev, cpu))
        lens.append(len(seq))
        tok = int(np.argmax(cpu))
        seq.append(tok)
        cpu = m.eval([tok], n_logits=1, state=st)[-1]
    v = min(cos) if all(math.isfinite(c) for c in cos) else float("nan")
    return Measured(v, detail=(f"{n} steps, device prefill of {lens[0]}..{lens[-1]} tokens on {be.device_name}; "
                               "cosines " + ", ".join(f"{c:.6f}" for c in cos)), data={"cosines": cos, "lengths": lens})


TABLE_TENSORS = frozenset({"rope_freqs.weight"})  # read into the RoPE tables at load, not weight buffers


def device_buffers(be) -> dict[str, dict[int, int]]:
    """The backend's OpenCL buffers by role: {"weights" | "activations" | "aux": {int_ptr: bytes}}, found by walking
    its attributes (lists, tuples, dicts included), so a buffer held anywhere is counted. Weights are every buffer
    that is not an activation / scratch buffer or the RoPE tables (KV caches live in DeviceKVState objects)."""
    import pyopencl as cl

    out: dict[str, dict[int, int]] = {"weights": {}, "activations": {}, "aux": {}}

    def walk(v, role):
        if isinstance(v, cl.MemoryObject):
            out[role][v.int_ptr] = int(v.size)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x, role)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x, role)

    for name, v in vars(be).items():
        role = "activations" if name in ACTIVATION_BUFFERS else "aux" if name in AUX_BUFFERS else "weights"
        walk(v, role)
    return out


def gwr_001(ctx, *, backend=None) -> Measured:
    """Bytes of the device buffers holding weights (``size`` of every weight buffer the backend holds, each counted
    once) over the bytes of the model's tensors (sum over the file's tensor index, less ``rope_freqs.weight``: Llama-3's
    RoPE frequency factors are folded into the RoPE tables, an aux buffer). Value: the ratio."""
    be = _backend(ctx, backend)
    bufs = device_buffers(be)
    wbytes = sum(bufs["weights"].values())
    mbytes = sum(int(t.nbytes) for n, t in ctx.model.source.tensors.items() if n not in TABLE_TENSORS)
    aux, act = sum(bufs["aux"].values()), sum(bufs["activations"].values())
    return Measured(wbytes / mbytes, detail=(f"{wbytes} B in {len(bufs['weights'])} weight buffers on "
                                             f"{be.device_name} / {mbytes} B of tensors; aux {aux} B, activations "
                                             f"{act} B not counted"),
                    data={"weight_bytes": wbytes, "model_bytes": mbytes, "buffers": len(bufs["weights"])})


def device_class(name: str):
    """(class, floor tok/s on the reference model, provenance) of a device name, or None."""
    low = name.lower()
    for k, (floor, why) in DEVICE_FLOORS.items():
        if k in low:
            return k, floor, why
    return None


def device_decode_rate(be, n_tokens: int = 8, reps: int = 2, step_delay: float | None = None) -> float:
    """Best-of-``reps`` decode tok/s on the device: n_tokens steps after a 1-token prompt, logits read back."""
    best = 0.0
    for _ in range(reps):
        st = be.new_state(n_tokens + 1)
        be.eval([1], 1, st)
        t0 = time.perf_counter()
        for _ in range(n_tokens):
            be.eval([1], 1, st)
            if step_delay:
                time.sleep(step_delay)
        best = max(best, n_tokens / (time.perf_counter() - t0))
    return best


def gwr_002(ctx, *, backend=None, floor: tuple[str, float] | None = None, step_delay: float | None = None,
            n_tokens: int | None = None) -> Measured:
    """Device decode tok/s (best of 2 runs of 8 tokens) over the floor of the device's class scaled to this model
    (floor x REF_MODEL_BYTES / model tensor bytes; :data:`DEVICE_FLOORS`). NOT_APPLICABLE on CPU OpenCL devices and
    on GPUs without a floor. Injection: ``floor`` = (class name, tok/s for this model) forces a floor;
    ``step_delay`` seconds are added to each device step (a slow-path regression); ``n_tokens`` per run."""
    be = _backend(ctx, backend)
    mbytes = sum(int(t.nbytes) for t in ctx.model.source.tensors.values())
    if floor is not None:
        cls_name, need, why = floor[0], float(floor[1]), "forced"
    else:
        if not be.is_gpu:
            raise NotApplicable(f"{be.device_name} is a {be.device.type} device: GWR-002 floors are set for GPU "
                                f"classes ({', '.join(DEVICE_FLOORS)})")
        dc = device_class(be.device_name)
        if dc is None:
            raise NotApplicable(f"no GWR-002 floor set for {be.device_name} (classes: {', '.join(DEVICE_FLOORS)})")
        cls_name, ref_floor, why = dc
        need = ref_floor * REF_MODEL_BYTES / mbytes
    rate = device_decode_rate(be, n_tokens or (16 if ctx.slow else 8), 2, step_delay)
    return Measured(rate / need, detail=f"{rate:.2f} tok/s on {be.device_name} vs floor {need:.2f} tok/s "
                    f"({cls_name}, {why})", data={"tok_s": rate, "floor_tok_s": need, "class": cls_name})


def gwr_003(ctx, *, backend=None, n_tokens: int = 4) -> Measured:
    """Weight uploads per decoded token from the backend's transfer counters (``last_step.weight_uploads`` of each of
    n_tokens decode steps after a 1-token prompt). Value: uploads / token; host-to-device bytes per token reported."""
    be = _backend(ctx, backend)
    st = be.new_state(n_tokens + 1)
    be.eval([1], 1, st)
    uploads = h2d = 0
    for _ in range(n_tokens):
        be.eval([1], 1, st)
        uploads += be.last_step.weight_uploads
        h2d += be.last_step.h2d_bytes
    return Measured(uploads / n_tokens, detail=(f"{n_tokens} decode steps on {be.device_name}: {uploads} weight "
                                                f"uploads, {h2d / n_tokens:.0f} B host-to-device per token"),
                    data={"uploads": uploads, "h2d_bytes": h2d, "tokens": n_tokens})


def _greedy(step, first_logits, n: int) -> list[int]:
    out, logits = [], first_logits
    for _ in range(n):
        tok = int(np.argmax(logits))
        out.append(tok)
        if len(out) < n:
            logits = step(tok)
    return out


def gwr_004(ctx, *, backend=None, n: int = GWR004_TOKENS) -> Measured:
    """20 greedy tokens from the same prompt on the CPU and on the OpenCL device (each path on its own logits and
    KV cache). Value: leading tokens equal (20 = all)."""
    be = _backend(ctx, backend)
    m = ctx.model
    ids = _prompt_ids(m)[0]
    cs = m.new_state(len(ids) + n)
    cpu = _greedy(lambda t: m.eval([t], state=cs)[-1], m.eval(ids, state=cs)[-1], n)
    ds = be.new_state(len(ids) + n)
    dev = _greedy(lambda t: be.eval([t], 1, ds)[-1], be.eval(ids, 1, ds)[-1], n)
    same = next((i for i, (a, b) in enumerate(zip(cpu, dev, strict=True)) if a != b), n)
    return Measured(float(same), detail=(f"{n} greedy tokens on {be.device_name}: " +
                                         ("identical" if same == n else f"first difference at token {same}")),
                    data={"cpu": cpu, "device": dev})


def gwr_005(ctx, *, backend=None) -> Measured:
    """On a device reporting host-unified memory (``CL_DEVICE_HOST_UNIFIED_MEMORY``), the fraction of weight buffers
    whose ``CL_MEM_FLAGS`` carry ``ALLOC_HOST_PTR`` or ``USE_HOST_PTR`` (host-accessible allocation: the device
    reads the weights in place, no device-side copy). NOT_APPLICABLE on devices without unified memory."""
    import pyopencl as cl

    be = _backend(ctx, backend)
    if not be.device.unified_memory:
        raise NotApplicable(f"{be.device_name} reports no host-unified memory")
    want = cl.mem_flags.ALLOC_HOST_PTR | cl.mem_flags.USE_HOST_PTR
    seen: dict[int, bool] = {}

    def walk(v, weights):
        if isinstance(v, cl.MemoryObject):
            if weights:
                seen[v.int_ptr] = bool(v.get_info(cl.mem_info.FLAGS) & want)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x, weights)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x, weights)

    for name, v in vars(be).items():
        walk(v, name not in ACTIVATION_BUFFERS and name not in AUX_BUFFERS)
    if not seen:
        raise RuntimeError("no weight buffers found on the backend")
    frac = sum(seen.values()) / len(seen)
    return Measured(frac, detail=f"{sum(seen.values())}/{len(seen)} weight buffers host-pointer allocated on "
                    f"{be.device_name} (unified memory)", data={"buffers": len(seen), "host_ptr": sum(seen.values())})

