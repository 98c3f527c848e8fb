"""What the gates measure on: the model, the encoder and the OpenCL path, loaded once and shared.

Each resource is loaded on first use. When it cannot be had (the model is an encoder, no OpenCL device,
the encoder is not available) the reason is remembered and every gate that needs it is NOT_APPLICABLE
with that reason; a resource that fails for another reason is re-raised (the gate FAILs).
"""

from __future__ import annotations

import copy
import io
from contextlib import redirect_stderr
from pathlib import Path

from apr_numba.gates.core import NotApplicable
from apr_numba.hub.registry import DEFAULT_MODEL

DEFAULT_ENCODER = "minilm-l6"


class GateContext:
    """Shared state of one gate run.

    Args:
        model: the decoder to gate (registry name or path); an encoder name/directory makes the decoder
            gates NOT_APPLICABLE and the encoder gates use it.
        encoder: the encoder for ENC-* when ``model`` is a decoder (default minilm-l6).
        slow: take the longer measurements (more repetitions).
        n_ctx: KV cache length of the loaded decoder.
        threads: kernel threads for the decoder (default: all cores).

    Attributes:
        cache: measurements shared between gates of one run (e.g. CPU-GPU-001 and 002 use the same logits).
    """

    def __init__(self, model=DEFAULT_MODEL, encoder=DEFAULT_ENCODER, slow: bool = False, n_ctx: int = 256,
                 threads: int | None = None):
        from apr_numba import runtime as _config

        _config.configure_threading()  # before any parallel kernel runs (WS-003 may be the first)
        self.model_spec, self.encoder_spec = model, encoder
        self.slow, self.n_ctx, self.threads = bool(slow), int(n_ctx), threads
        self.cache: dict = {}
        self._model = self._encoder = self._opencl = None
        self._why: dict[str, str] = {}
        self._path: Path | None = None

    # -- the decoder -------------------------------------------------------------------------------
    @property
    def model_path(self) -> Path:
        if self._path is None:
            from apr_numba.hub.pull import resolve_model

            self._path = Path(resolve_model(self.model_spec, progress=False))
        return self._path

    def is_encoder_model(self) -> bool:
        return self.model_path.is_dir()

    @property
    def model(self):
        """The decoder :class:`~apr_numba.model.decoder.Model` on the CPU backend.

        Raises:
            NotApplicable: the model is an encoder.
        """
        if self._model is None:
            if self.is_encoder_model():
                raise NotApplicable(f"{self.model_spec} is an encoder, not a decoder")
            from apr_numba.model.decoder import load

            self._model = load(self.model_path, backend="cpu", n_ctx=self.n_ctx, threads=self.threads)
        return self._model

    # -- the encoder -------------------------------------------------------------------------------
    @property
    def encoder(self):
        """The :class:`~apr_numba.encoder.model.EncoderModel` for ENC-*.

        Raises:
            NotApplicable: no encoder could be had (not pulled and not pullable, or it does not load).
        """
        if "encoder" in self._why:
            raise NotApplicable(self._why["encoder"])
        if self._encoder is None:
            from apr_numba.encoder.model import load_encoder
            from apr_numba.errors import AprError

            spec = self.model_path if self.is_encoder_model() else self.encoder_spec
            try:
                self._encoder = load_encoder(spec, threads=self.threads)
            except AprError as exc:
                self._why["encoder"] = f"no encoder available ({spec}: {exc})"
                raise NotApplicable(self._why["encoder"]) from None
        return self._encoder

    # -- the OpenCL path ---------------------------------------------------------------------------
    def _need_opencl(self) -> None:
        if "opencl" in self._why:
            raise NotApplicable(self._why["opencl"])
        try:
            from apr_numba.backends.opencl_kernels import list_devices
        except Exception as exc:  # noqa: BLE001 - pyopencl missing or its ICD loader broken
            self._why["opencl"] = f"no OpenCL runtime ({type(exc).__name__}: {exc})"
            raise NotApplicable(self._why["opencl"]) from None
        if not list_devices():
            self._why["opencl"] = "no OpenCL device"
            raise NotApplicable(self._why["opencl"])

    @property
    def opencl_backend(self):
        """An :class:`~apr_numba.backends.opencl.OpenCLBackend` of the model (default device), built directly,
        *not* through the parity gate, so the gates measure the device path whatever the gate would decide.

        Raises:
            NotApplicable: no pyopencl / no OpenCL device. OpenCLError: a kernel failed to build (a FAIL).
        """
        if self._opencl is None:
            self._opencl = self.make_backend()
        return self._opencl

    def make_backend(self, fault: str | None = None):
        """A new OpenCLBackend of the model (``fault``: an injected kernel fault, for falsification tests)."""
        self._need_opencl()
        from apr_numba.backends.opencl import OpenCLBackend

        return OpenCLBackend(self.model, fault=fault)

    def open_gated(self, fault: str | None = None):
        """A shallow copy of the CPU model (sharing its weights) put through the real load-time switch
        (:func:`apr_numba.backends.parity.open_opencl_path`, backend "opencl"), with what it wrote to stderr in
        ``model._gate_stderr``. ``fault`` is injected into the device kernels."""
        self._need_opencl()
        from apr_numba.backends.parity import open_opencl_path

        m = copy.copy(self.model)
        m.use_cpu()
        err = io.StringIO()
        with redirect_stderr(err):
            open_opencl_path(m, "opencl", fault=fault)
        m._gate_stderr = err.getvalue()
        return m
