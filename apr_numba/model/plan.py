"""The tensor plan: the one place where a model file's tensors are checked against an :class:`ArchSpec`.

Every backend loads its weights through this module: the Numba CPU packer (:mod:`apr_numba.model.weights`),
the OpenCL uploader (:mod:`apr_numba.backends.opencl`) and the float64 reference
(:mod:`apr_numba.backends.reference`). :func:`check_tensors` verifies, once per load, that every tensor the
description names is present, has the expected NumPy shape (GGUF ``ne`` reversed, llama.cpp
``create_tensor`` shapes) and a GGML type this engine decodes; :func:`tensor` and :func:`vector` then hand a
backend one checked tensor or a float32 vector (norm weights, biases).

A *source* is anything with ``path``, ``metadata``, ``tensors`` (name -> object with ``ggml_type`` and
``shape``) and ``data(name) -> uint8 array``: :class:`~apr_numba.formats.gguf_file.GGUFFile`,
:class:`~apr_numba.formats.apr_file.AprFile`.
"""

from __future__ import annotations

import numpy as np

from apr_numba.arch.spec import ArchSpec, TensorSpec
from apr_numba.errors import ModelFormatError
from apr_numba.quants.layouts import SUPPORTED_TYPES, decode_codes


def _type_name(ggml_type: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


def tensor(src, ts: TensorSpec):
    """The source's tensor ``ts.name``, checked for presence and shape.

    Raises:
        ModelFormatError: missing, or a shape other than ``ts.shape`` (the file and tensor named).
    """
    t = src.tensors.get(ts.name)
    if t is None:
        raise ModelFormatError(f"{src.path}: required tensor {ts.name!r} is missing")
    if tuple(t.shape) != tuple(ts.shape):
        raise ModelFormatError(f"{src.path}: tensor {ts.name} has shape {tuple(t.shape)}, expected {ts.shape}")
    return t


def vector(src, ts: TensorSpec) -> np.ndarray:
    """A 1-D tensor (norm weight, bias, rope_freqs) decoded to float32 (n,), exactly (gguf-py's values)."""
    t = tensor(src, ts)
    return decode_codes(t.ggml_type, src.data(ts.name), (1, ts.shape[0]), ts.name).dequantize()[0]


def all_tensors(spec: ArchSpec) -> list[TensorSpec]:
    """Every tensor the description names: the whole-model ones, then each block's in load order."""
    out = list(spec.model_tensors().values())
    for layer in range(spec.hp.n_layer):
        out.extend(spec.block_tensors(layer).values())
    return out


def check_tensors(spec: ArchSpec, src, types: frozenset = SUPPORTED_TYPES) -> None:
    """Check every tensor of ``spec`` in ``src`` (presence, shape, decodable type) before anything is loaded.

    Raises:
        ModelFormatError: the first tensor that is missing, misshapen or of a type outside ``types``; the
            message names the file, the tensor and the supported types.
    """
    for ts in all_tensors(spec):
        t = tensor(src, ts)
        if int(t.ggml_type) not in types:
            known = ", ".join(sorted(_type_name(x) for x in types if x < 128))
            raise ModelFormatError(f"{src.path}: tensor {ts.name} has type {_type_name(int(t.ggml_type))}, "
                                   f"which this engine does not decode (supported: {known})")


def rope_freqs(spec: ArchSpec, src) -> np.ndarray | None:
    """The file's RoPE frequency divisors float32 (head_dim/2,) (``rope_freqs.weight``), or None without."""
    return vector(src, spec.model_tensors()["rope_freqs.weight"]) if spec.rope_freqs else None
