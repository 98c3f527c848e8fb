"""Shared, session-cached traces for tests/test_trace.py and tests/test_bisect.py.

The float64 reference trace of a model (all stages, all layers) costs ~8 s (SmolLM2) / ~25 s (Qwen2.5)
on 2 cores, so it is made once per model per session for the one prompt every test uses and reused
across faults; CPU traces take 0.1-0.5 s each.
"""

from __future__ import annotations

import math

from apr_numba.debug.tracing import Trace, trace
from apr_numba.model.decoder import load

MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b")
# <|im_start|> (ChatML, both models' chat-start token) makes SmolLM2's layer 10 put a score of ~28 on it;
# the softmax-no-max fault needs scores above ln(65504) to show (see docs/bisection-tutorial.md).
PROMPT = "<|im_start|>The capital of France is Paris"
MID = {"smollm2-135m": 10, "qwen2.5-coder-0.5b": 11}  # the "middle layer" of the fault grid
LN_F16_MAX = math.log(65504.0)

_MODELS: dict = {}
_REF: dict = {}
_DIRS: dict = {}


def model(name: str):
    """A CPU model (n_ctx 512), loaded once per session."""
    if name not in _MODELS:
        _MODELS[name] = load(name, backend="cpu", n_ctx=512)
    return _MODELS[name]


def reference_trace(name: str) -> Trace:
    """All stages of all layers of PROMPT on the float64 reference, once per session."""
    if name not in _REF:
        _REF[name] = trace(model(name), PROMPT, backend="reference")
    return _REF[name]


def reference_dir(name: str, tmp_path_factory) -> str:
    """reference_trace(name) saved as a trace folder (APRT files + trace.json), once per session."""
    if name not in _DIRS:
        d = tmp_path_factory.mktemp(f"ref-{name}")
        reference_trace(name).save(d)
        _DIRS[name] = str(d)
    return _DIRS[name]


def opencl_missing() -> str | None:
    """Why OpenCL traces cannot run here (no pyopencl, no device, no dbg hook), or None."""
    import inspect

    try:
        from apr_numba.backends.opencl import OpenCLBackend
        from apr_numba.backends.opencl_kernels import list_devices
    except Exception as exc:  # noqa: BLE001
        return f"no OpenCL: {exc}"
    if "dbg" not in inspect.signature(OpenCLBackend.run).parameters:
        return "OpenCLBackend.run has no dbg (stage capture) hook"
    try:
        if not list_devices():
            return "no OpenCL device"
    except Exception as exc:  # noqa: BLE001
        return f"no OpenCL platform: {exc}"
    return None
