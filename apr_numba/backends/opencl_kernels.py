"""OpenCL devices, kernel sources and program builds for :mod:`apr_numba.backends.opencl`.

Kernel sources are the ``.cl`` files of the repository's top-level ``opencl/`` folder, one op per file
(ggml-opencl style; see each file's header). They are found next to the package
(``opencl/`` beside the ``apr_numba`` folder, which is where they are in a source checkout and
an editable install), else inside the package (``importlib.resources.files("apr_numba") / "opencl"``:
a wheel or ``pip install .`` ships them there as the data-only package ``apr_numba.opencl``, mapped from
the top-level folder by ``setup.py``), else in ``$APR_OPENCL_KERNELS``.

Two kinds of program are built per device and model:

* the *ops* program (RMSNorm, RoPE, KV store, attention, SwiGLU / GeGLU, add, argmax, and the block
  features' QK-norm, scale, soft-cap and MoE axpy), with ``-D WG=`` and ``-D HEAD_DIM=``;
* one *quant* program per weight type the model uses (``quants.cl`` + ``matvec_f32.cl`` +
  ``get_rows_f32.cl`` with ``-D WTYPE=q4_K`` ...), with ``-D LANES= -D ROWS= -D TB=``.

Work-group sizes are chosen per device (:func:`choose_tuning`) from ``max_work_group_size``, the
kernel's preferred work-group size multiple (the SIMD / warp / wavefront width) and the device type,
never fixed for one GPU. ``pyopencl`` is imported only by this module and the backend, so a CPU-only
run (``--no-gpu``) never loads it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pyopencl as cl
from gguf import GGMLQuantizationType as T

from apr_numba.errors import AprError

# GGML type id -> the WTYPE name of quants.cl (block structs and chunk decoders).
WTYPES = {int(T.F32): "f32", int(T.F16): "f16", int(T.BF16): "bf16", int(T.Q4_0): "q4_0", int(T.Q4_1): "q4_1",
          int(T.Q5_0): "q5_0", int(T.Q5_1): "q5_1", int(T.Q8_0): "q8_0", int(T.Q4_K): "q4_K", int(T.Q6_K): "q6_K",
          int(T.Q2_K): "q2_K", int(T.Q3_K): "q3_K", int(T.Q5_K): "q5_K", int(T.IQ4_NL): "iq4_nl",
          int(T.IQ4_XS): "iq4_xs"}
OPS_FILES = ("rms_norm_f32", "rope_f32", "cpy_kv_f32", "attn_f32", "swiglu_f32", "add_f32", "argmax_f32",
             "arch_ops_f32")
QUANT_FILES = ("quants", "matvec_f32", "get_rows_f32")
FAULTS = ("scale",)  # fault injections for tests of the parity gate (quants.cl FAULT_SCALE)


class OpenCLError(AprError):
    """No usable OpenCL device, or a kernel failed to build."""


def kernel_dir() -> Path:
    """The folder holding the ``.cl`` sources: ``<checkout>/opencl``, else the installed package's
    ``apr_numba/opencl`` (package data), else ``$APR_OPENCL_KERNELS`` (the module docstring says why).

    Raises:
        OpenCLError: no folder with ``matvec_f32.cl`` was found.
    """
    cands = [Path(__file__).resolve().parents[2] / "opencl"]
    try:
        cands.append(Path(str(resources.files("apr_numba") / "opencl")))
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - namespace/zip installs
        pass
    if os.environ.get("APR_OPENCL_KERNELS"):
        cands.append(Path(os.environ["APR_OPENCL_KERNELS"]))
    for d in cands:
        if (d / "matvec_f32.cl").is_file():
            return d
    raise OpenCLError(f"OpenCL kernel sources not found (looked in {', '.join(map(str, cands))})")


def read_source(stem: str) -> str:
    """Text of ``opencl/<stem>.cl``."""
    return (kernel_dir() / f"{stem}.cl").read_text()


@dataclass(frozen=True)
class DeviceInfo:
    """One OpenCL device: flat index over all platforms (the ``--device N`` number), names and type."""

    index: int
    platform: str
    name: str
    type: str  # "GPU", "CPU", "ACCELERATOR" ...
    is_gpu: bool
    global_mem: int
    max_alloc: int
    unified_memory: bool

    def label(self) -> str:
        return f"{self.name.strip()} [{self.platform.strip()}, {self.type}]"


_PROBED: dict[str, str] = {}  # device label -> "" (builds) or why its compiler cannot build a kernel
_PROBE_SRC = "kernel void probe(global float *x) { x[get_global_id(0)] = 1.0f; }"


def _compiler_problem(d, label: str) -> str:
    """"" when ``d``'s OpenCL compiler builds a trivial kernel, else the driver's reason (probed once per
    process). Seen here: PoCL 3.0 (LLVM 14) on an AMD Zen 5 CPU it does not know asks clang for target CPU
    'generic' and every build fails; such a device is left out of the list, and the reason is kept
    (:func:`unusable_devices`)."""
    if label not in _PROBED:
        try:
            ctx = cl.Context([d])
            cl.Program(ctx, _PROBE_SRC).build()
            _PROBED[label] = ""
        except cl.Error as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if "error" in ln.lower()]
            _PROBED[label] = (lines[-1] if lines else str(exc).splitlines()[0])[:200]
    return _PROBED[label]


def _devices(probe: bool = True) -> list[tuple[DeviceInfo, object]]:
    out = []
    try:
        platforms = cl.get_platforms()
    except cl.Error:  # no ICD / no platform
        return out
    for p in platforms:
        try:
            devs = p.get_devices()
        except cl.Error:
            continue
        for d in devs:
            try:
                unified = bool(d.host_unified_memory)
            except cl.Error:  # pragma: no cover - removed in some 3.0 drivers
                unified = False
            kind = next((n for n in ("GPU", "CPU", "ACCELERATOR") if d.type & getattr(cl.device_type, n)), "OTHER")
            info = DeviceInfo(len(out), p.name, d.name, kind, kind == "GPU", int(d.global_mem_size),
                              int(d.max_mem_alloc_size), unified)
            if probe and _compiler_problem(d, info.label()):
                continue
            out.append((info, d))
    return out


def unusable_devices() -> dict[str, str]:
    """Devices left out of :func:`list_devices` because their compiler cannot build a kernel: label -> reason."""
    for info, d in _devices(probe=False):
        _compiler_problem(d, info.label())
    return {k: v for k, v in _PROBED.items() if v}


def list_devices() -> list[DeviceInfo]:
    """Every usable OpenCL device of every platform, in ``--device N`` order: a device whose compiler cannot
    build a trivial kernel is left out (see :func:`unusable_devices`; one probe context per device and process)."""
    return [i for i, _ in _devices()]


def find_device(index: int | None = None, gpu_only: bool = False):
    """(DeviceInfo, cl.Device) of device ``index``, or the first GPU (then, unless ``gpu_only``, the first
    device of any type); None when there is none (or device ``index`` is not a GPU with ``gpu_only``).

    Raises:
        OpenCLError: ``index`` is out of range.
    """
    devs = _devices()
    if index is not None:
        if not 0 <= index < len(devs):
            raise OpenCLError(f"OpenCL device {index} does not exist ({len(devs)} device(s) found)")
        info, dev = devs[index]
        return None if gpu_only and not info.is_gpu else (info, dev)
    for info, dev in devs:
        if info.is_gpu:
            return info, dev
    return None if gpu_only or not devs else devs[0]


@dataclass(frozen=True)
class Tuning:
    """Build-time work-group shapes for one device.

    lanes x rows: the matvec work-group (lanes share one row, rows rows per group); tb: tokens per pass
    of the prefill matmul; wg: work-group size of RMSNorm, attention and argmax. All powers of two.
    """

    lanes: int
    rows: int
    tb: int
    wg: int


def _pow2_floor(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


def choose_tuning(dev, simd: int) -> Tuning:
    """Work-group shapes for ``dev`` given its preferred work-group size multiple ``simd``.

    GPUs: a row is shared by one warp/wavefront-sized set of lanes (``simd``, at least 16, at most 64),
    4 rows per group (as llama.cpp's N_R0 rows per subgroup), 4 tokens per prefill pass. CPU devices
    (PoCL): work-items are loop iterations of one thread per group, so a row gets 1 lane (no reduction;
    the float8 chunk code is the SIMD work) and a group 16 rows; measured on PoCL 3.0 / AVX2, lanes 1, 2
    and 4 are within noise, the chunk decode dominates. Everything is capped by ``max_work_group_size``
    and the local memory size.
    """
    max_wg = _pow2_floor(dev.max_work_group_size)
    if dev.type & cl.device_type.GPU:
        lanes = min(max(_pow2_floor(simd), 16), 64, max_wg)
        rows = max(1, min(4, max_wg // lanes))
        wg = min(128, max_wg)
    else:
        lanes, rows, wg = 1, min(16, max_wg), min(64, max_wg)
    tb = 4
    while tb > 1 and tb * rows * lanes * 4 > dev.local_mem_size // 2:
        tb //= 2
    return Tuning(lanes, rows, tb, wg)


class Programs:
    """The built programs of one device for one model: ops kernels and per-type matvec / get_rows.

    Attributes:
        ctx, queue: the OpenCL context and its in-order command queue.
        info: :class:`DeviceInfo`. tuning: :class:`Tuning`. fault: the injected fault or None.
    """

    def __init__(self, info: DeviceInfo, dev, head_dim: int, fault: str | None = None):
        if fault is not None and fault not in FAULTS:
            raise OpenCLError(f"unknown OpenCL fault {fault!r} (choose from {', '.join(FAULTS)})")
        self.info, self.dev, self.fault = info, dev, fault
        self.build_logs: list[str] = []  # compiler output of every build (empty when warning-free)
        self.ctx = cl.Context([dev])
        self.queue = cl.CommandQueue(self.ctx)
        probe = self._build("kernel void probe(global float *x) { x[get_global_id(0)] = 0.0f; }", [])
        simd = probe.probe.get_work_group_info(cl.kernel_work_group_info.PREFERRED_WORK_GROUP_SIZE_MULTIPLE, dev)
        self.tuning = choose_tuning(dev, int(simd))
        self.head_dim = int(head_dim)
        src = "\n".join(read_source(s) for s in OPS_FILES)
        ops = self._build(src, [f"-D WG={self.tuning.wg}", f"-D HEAD_DIM={self.head_dim}"])
        self.rms_norm = ops.kernel_rms_norm_f32
        self.rms_norm.set_scalar_arg_dtypes([None, np.int32, np.int32, None, None, np.int32, np.int32, np.float32])
        self.rope = ops.kernel_rope_f32
        self.rope.set_scalar_arg_dtypes([None, np.int32, np.int32, np.int32, np.int32, None, None, np.int32])
        self.cpy_kv = ops.kernel_cpy_kv_f32
        self.cpy_kv.set_scalar_arg_dtypes([None, np.int32, np.int32, np.int32, None, None, np.int64, np.int32])
        self.attn = ops.kernel_attn_f32
        self.attn.set_scalar_arg_dtypes([None, np.int32, None, None, np.int64, np.int32, np.int32, np.int32,
                                         None, np.int32, None, np.int32, np.float32, np.int32, np.int32,
                                         np.int32, np.int32, np.int32, None, None, np.int32])
        self.swiglu = ops.kernel_swiglu_f32
        self.swiglu.set_scalar_arg_dtypes([None, None, np.int32, np.int32, np.int32])
        self.add = ops.kernel_add_f32
        self.add.set_scalar_arg_dtypes([None, None, np.int32])
        self.argmax = ops.kernel_argmax_f32
        self.argmax.set_scalar_arg_dtypes([None, np.int32, None])
        self.rms_norm_heads = ops.kernel_rms_norm_heads_f32
        self.rms_norm_heads.set_scalar_arg_dtypes([None, np.int32, np.int32, np.int32, None, np.float32])
        self.scale = ops.kernel_scale_f32
        self.scale.set_scalar_arg_dtypes([None, np.float32])
        self.softcap = ops.kernel_softcap_f32
        self.softcap.set_scalar_arg_dtypes([None, np.float32])
        self.axpy = ops.kernel_axpy_f32
        self.axpy.set_scalar_arg_dtypes([None, np.int32, None, np.int32, np.float32])
        self._quant: dict[int, tuple] = {}

    def _build(self, src: str, options: list[str]):
        try:
            with warnings.catch_warnings():  # compiler chatter (pyopencl CompilerWarning) is not for users
                warnings.simplefilter("ignore")
                prg = cl.Program(self.ctx, src).build(options=options + ["-cl-std=CL1.2"])
        except cl.Error as exc:
            raise OpenCLError(f"OpenCL build failed on {self.info.label()}: {str(exc)[:2000]}") from exc
        self.build_logs.append(prg.get_build_info(self.dev, cl.program_build_info.LOG).strip())
        if prg.num_kernels == 0:  # PoCL 3.0 reloads a cached build that had warnings without its kernels
            raise OpenCLError(f"OpenCL build on {self.info.label()} produced no kernels (stale PoCL kernel "
                              f"cache? try POCL_KERNEL_CACHE=0); options {' '.join(options)}")
        return prg

    def quant(self, ggml_type: int):
        """(matvec, get_rows) kernels for GGML type ``ggml_type``, built on first use.

        Raises:
            OpenCLError: the type has no OpenCL kernel, or the build failed.
        """
        k = self._quant.get(ggml_type)
        if k is None:
            name = WTYPES.get(int(ggml_type))
            if name is None:
                raise OpenCLError(f"no OpenCL kernel for GGML type {ggml_type}")
            t = self.tuning
            opts = [f"-D WTYPE={name}", f"-D LANES={t.lanes}", f"-D ROWS={t.rows}", f"-D TB={t.tb}"]
            if self.fault == "scale":
                opts.append("-D FAULT_SCALE")
            prg = self._build("\n".join(read_source(s) for s in QUANT_FILES), opts)
            mv = getattr(prg, f"kernel_matvec_{name}_f32")
            mv.set_scalar_arg_dtypes([None, np.int32, np.int32, None, np.int32, None, np.int32, np.int32, np.int32])
            gr = getattr(prg, f"kernel_get_rows_{name}_f32")
            gr.set_scalar_arg_dtypes([None, np.int32, None, None, np.int32])
            k = self._quant[ggml_type] = (mv, gr)
        return k

    def matvec(self, ggml_type: int, w, ncols: int, nrows: int, x, x_stride: int, y, y_stride: int, y_off: int,
               ntok: int) -> None:
        """Enqueue y[t, y_off + r] = sum_c W[r, c] x[t, c] for t < ntok, r < nrows (see matvec_f32.cl)."""
        mv = self.quant(ggml_type)[0]
        t = self.tuning
        gr = -(-nrows // t.rows) * t.rows
        mv(self.queue, (t.lanes, gr, -(-ntok // t.tb)), (t.lanes, t.rows, 1),
           w, ncols, nrows, x, x_stride, y, y_stride, y_off, ntok)

    def get_rows(self, ggml_type: int, w, ncols: int, ids, out, out_stride: int, ntok: int) -> None:
        """Enqueue out[t, :] = W[ids[t], :] decoded (see get_rows_f32.cl)."""
        self.quant(ggml_type)[1](self.queue, (ncols // 32, ntok), None, w, ncols, ids, out, out_stride)
