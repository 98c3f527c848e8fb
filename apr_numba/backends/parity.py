"""The CPU-vs-GPU parity gate ("jidoka"): a device path that disagrees with the CPU never runs.

aprender's gates CPU-GPU-001..006 (shared/docs/aprender-facts.md): at load, after the weights are on
the device, N probe steps (default 3, ``APR_OPENCL_PARITY_STEPS`` 1..16) run on both paths from the same
first token, each path with its own throwaway KV cache (never the model's), both advanced by the CPU's
argmax. A step fails when

* the cosine of the two logits rows is below :data:`COS_MIN` (0.99), or not finite; or
* the argmaxes differ, except at a near-tie: the token the device picked must have, on the CPU, a logit
  within :data:`NEAR_TIE` (1 %) relative of the CPU's best, ``cpu[best] - cpu[picked] <= 0.01 * |cpu[best]|``
  (so the CPU's top-2 are within 1 %, the rule of tests/test_parity.py against HF, and the device picked
  one of them): there two float32 accumulation orders may legitimately swap the winners.

On the first failing step, or when the probe raises (kernel build failure, out of device memory, a
driver error), the caller prints exactly one line to stderr, always (:func:`report_rejection`), e.g.
(one line, wrapped here)::

    [apr-cpu-vs-gpu-output-parity-v1] OpenCL path rejected, attempting fallback:
    cosine vs CPU = 0.766079 (< 0.99) at step 2/3

and continues on the CPU, so the user still gets the CPU's answer (fail closed).

After the N decode steps (one token per call, the matrix-vector kernels) pass, the same N tokens run once
more as one batched call (the prefill matrix-matrix kernels, gate CPU-GPU-006) on a fresh throwaway
cache, and each of its N logits rows is held to the same two rules against the CPU's row of that step;
a failure there prints the same line (``ParityResult.path`` says "batched").
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field

import numpy as np

from apr_numba.errors import ArgumentError

TAG = "[apr-cpu-vs-gpu-output-parity-v1]"
COS_MIN = 0.99
NEAR_TIE = 0.01
DEFAULT_STEPS = 3
MAX_STEPS = 16


@dataclass
class ParityResult:
    """Outcome of the gate.

    passed: every step passed. cosines: cosine per completed step (float64). argmax_equal: per step.
    step_failed: 1-based failing step, or None. reason: the failure text after "attempting fallback: ",
    or "". steps: probe steps requested. device: the device probed. batched_cosines: per step, of the
    batched (prefill) re-run. path: where it failed ("decode", "batched", or "" when it passed).
    """

    passed: bool
    cosines: list[float] = field(default_factory=list)
    argmax_equal: list[bool] = field(default_factory=list)
    step_failed: int | None = None
    reason: str = ""
    steps: int = DEFAULT_STEPS
    device: str = ""
    batched_cosines: list[float] = field(default_factory=list)
    path: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def parity_steps(value=None) -> int:
    """Probe steps: ``value``, else ``$APR_OPENCL_PARITY_STEPS``, else 3.

    Raises:
        ArgumentError: not an integer in [1, 16].
    """
    raw = value if value is not None else os.environ.get("APR_OPENCL_PARITY_STEPS", DEFAULT_STEPS)
    try:
        n = int(raw)
    except (TypeError, ValueError):
        n = 0
    if not 1 <= n <= MAX_STEPS:
        raise ArgumentError(f"APR_OPENCL_PARITY_STEPS must be an integer in [1, {MAX_STEPS}], got {raw!r}")
    return n


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two vectors, accumulated in float64 (0 when a norm is 0; NaN stays NaN)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))


def run_parity_gate(cpu_model, backend, first_token: int, steps: int | None = None) -> ParityResult:
    """Probe ``backend`` against ``cpu_model`` for ``steps`` decode steps from ``first_token``.

    Args:
        cpu_model: a :class:`~apr_numba.model.decoder.Model` running its CPU path (``eval(ids, state=...)``).
        backend: anything with ``new_state(n_ctx)``, ``eval(ids, n_logits, state)`` and ``device_name``.
        first_token: the first token id of both probes.
        steps: probe steps (default :func:`parity_steps`).

    Returns:
        :class:`ParityResult`; exceptions of the probe are caught and reported as a failure.
    """
    n = parity_steps(steps)
    res = ParityResult(passed=False, steps=n, device=getattr(backend, "device_name", ""))
    tok, k, refs, toks = int(first_token), 0, [], []
    try:
        cpu_state, dev_state = cpu_model.new_state(n), backend.new_state(n)
        res.path = "decode"
        for k in range(1, n + 1):
            ref = np.asarray(cpu_model.eval([tok], n_logits=1, state=cpu_state)[-1])
            got = np.asarray(backend.eval([tok], 1, dev_state)[-1])
            toks.append(tok)
            refs.append(ref)
            cos = cosine(got, ref)
            res.cosines.append(cos)
            res.argmax_equal.append(int(np.argmax(ref)) == int(np.argmax(got)))
            if _judge(res, k, n, ref, got, cos):
                return res
            tok = int(np.argmax(ref))
        res.path, k = "batched", 1
        rows = np.asarray(backend.eval(toks, n, backend.new_state(n)))
        for k in range(1, n + 1):
            cos = cosine(rows[k - 1], refs[k - 1])
            res.batched_cosines.append(cos)
            if _judge(res, k, n, refs[k - 1], rows[k - 1], cos):
                return res
    except Exception as exc:  # noqa: BLE001 - any probe failure must fall back (fail closed)
        res.step_failed = max(k, 1)
        msg = " ".join(str(exc).split())[:300]
        res.reason = f"probe failed: {type(exc).__name__}: {msg} at step {max(k, 1)}/{n}"
        return res
    res.passed, res.path = True, ""
    return res


def _judge(res: ParityResult, k: int, n: int, ref: np.ndarray, got: np.ndarray, cos: float) -> bool:
    """Record a failure of step k (cosine rule, then the argmax / near-tie rule); True when it failed."""
    if not cos >= COS_MIN:  # also catches NaN
        res.step_failed, res.reason = k, f"cosine vs CPU = {cos:.6f} (< {COS_MIN}) at step {k}/{n}"
        return True
    ref_top, got_top = int(np.argmax(ref)), int(np.argmax(got))
    if ref_top != got_top:
        gap = float(ref[ref_top]) - float(ref[got_top])  # on the CPU's logits
        if not gap <= NEAR_TIE * abs(float(ref[ref_top])):
            res.step_failed = k
            res.reason = (f"argmax vs CPU = {got_top} != {ref_top} (cosine {cos:.6f}, CPU logit gap "
                          f"{gap:.4g} > {NEAR_TIE:.0%}) at step {k}/{n}")
            return True
    return False


def report_rejection(reason: str, path: str = "OpenCL", file=None) -> None:
    """Print the one rejection line to stderr (always, whatever the verbosity)."""
    print(f"{TAG} {path} path rejected, attempting fallback: {reason}", file=file or sys.stderr, flush=True)


def _env_int(name: str, value):
    if value is not None:
        return value
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ArgumentError(f"{name} must be an integer device index, got {raw!r}") from None


def open_opencl_path(model, backend: str = "auto", device: int | None = None, fault: str | None = None,
                     steps: int | None = None):
    """Select, upload and gate the OpenCL path of ``model`` (called by ``load`` unless backend is "cpu").

    "auto" looks for a GPU device only and, without one (or without pyopencl), leaves the model on
    the CPU and prints nothing. "opencl" uses device ``device`` (default ``$APR_OPENCL_DEVICE``, else
    the first GPU, else the first device). The backend is built (weights uploaded), then
    :func:`run_parity_gate` probes it from the BOS token (else token 0); if it passes the model switches
    to it (``model.use_opencl``), otherwise :func:`report_rejection` prints the one line and the model
    stays on the CPU. ``model.parity`` holds the :class:`ParityResult` either way.

    Returns:
        the OpenCLBackend in use, or None.

    Raises:
        ArgumentError: a bad device index or APR_OPENCL_PARITY_STEPS / APR_OPENCL_DEVICE value, an
            unknown fault name.
    """
    device = _env_int("APR_OPENCL_DEVICE", device)
    if device is not None and (isinstance(device, bool) or not isinstance(device, int) or device < 0):
        raise ArgumentError(f"OpenCL device index must be an integer >= 0, got {device!r}")
    fault = fault if fault is not None else (os.environ.get("APR_OPENCL_FAULT", "").strip() or None)
    if fault is not None and fault not in ("scale",):
        raise ArgumentError(f"unknown OpenCL fault {fault!r} (choose from scale)")
    n = parity_steps(steps)
    try:
        from apr_numba.backends.opencl_kernels import find_device
    except Exception as exc:  # noqa: BLE001 - pyopencl missing or its ICD loader broken
        if backend == "auto":
            return None
        return _reject(model, n, "", f"probe failed: OpenCL unavailable ({type(exc).__name__}: {exc}) "
                                     f"before step 1/{n}")
    if backend == "auto":
        try:
            found = find_device(device, gpu_only=True)
        except Exception:  # noqa: BLE001 - a bad index or a broken platform: auto means "only if it works"
            found = None
        if found is None:
            return None
        device = found[0].index
    try:
        from apr_numba.backends.opencl import OpenCLBackend

        be = OpenCLBackend(model, device_index=device, fault=fault)
    except Exception as exc:  # noqa: BLE001 - build failure, out of memory, driver error: fail closed
        msg = " ".join(str(exc).split())[:300]
        return _reject(model, n, "", f"probe failed: {type(exc).__name__}: {msg} before step 1/{n}")
    bos = model.tokenizer.bos_id
    res = run_parity_gate(model, be, bos if bos is not None else 0, n)
    if not res.passed:
        return _reject(model, n, be.device_name, res.reason, res)
    model.use_opencl(be, res)
    return be


def _reject(model, n: int, device: str, reason: str, res: ParityResult | None = None) -> None:
    if res is None:
        res = ParityResult(passed=False, step_failed=None, reason=reason, steps=n, device=device)
    model.parity = res
    report_rejection(reason)
    return None
