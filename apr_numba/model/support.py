"""Fast refusal: decide from a GGUF header alone whether this engine can run the file, before the vocabulary
is parsed or any weight is touched (issue 13: an unsupported file is refused in well under a second).

What is supported is defined where it is implemented: architectures in :data:`apr_numba.arch.traits.ARCH_TRAITS`
(and, per backend, the features of :class:`~apr_numba.arch.spec.ArchSpec` the CPU forward executes), tensor
types in :data:`apr_numba.quants.blocks.SUPPORTED_TYPES`, tokenizer models in
:data:`apr_numba.model.tokenizer.SUPPORTED_TOKENIZER_MODELS`.
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

from apr_numba.arch.spec import ArchSpec
from apr_numba.arch.traits import ARCH_TRAITS
from apr_numba.errors import ModelFormatError
from apr_numba.formats.gguf_header import probe_gguf
from apr_numba.quants.blocks import SUPPORTED_TYPES


def _type_name(t: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(t).name
    except ValueError:
        return f"type {t}"


def refuse_unsupported(path) -> ArchSpec:
    """Read ``path``'s header (scalars and tensor infos only) and refuse what cannot run here.

    Returns:
        the file's :class:`ArchSpec` (built without the vocabulary).

    Raises:
        ModelFormatError: an unknown architecture, tensor types no decoder here reads, a tokenizer model
            without a builder, or an architecture feature the CPU forward lacks; each message names the file,
            what is unsupported and what is supported.
    """
    from apr_numba.backends.cpu_forward import IMPLEMENTS
    from apr_numba.model.tokenizer import SUPPORTED_TOKENIZER_MODELS

    meta, infos = probe_gguf(path)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or arch not in ARCH_TRAITS:
        raise ModelFormatError(f"{path}: unsupported architecture {arch!r} (supported: {', '.join(ARCH_TRAITS)})")
    bad = Counter(_type_name(t) for _, _, t, _ in infos if t not in SUPPORTED_TYPES)
    if bad:
        known = ", ".join(sorted(_type_name(t) for t in SUPPORTED_TYPES if t < 128))
        got = ", ".join(f"{k} ({n} tensors)" for k, n in sorted(bad.items()))
        first = next(name for name, _, t, _ in infos if t not in SUPPORTED_TYPES)
        raise ModelFormatError(f"{path}: unsupported tensor types {got}, e.g. tensor {first} "
                               f"(supported: {known})")
    tok = meta.get("tokenizer.ggml.model")
    if tok is not None and tok not in SUPPORTED_TOKENIZER_MODELS:
        raise ModelFormatError(f"{path}: unsupported tokenizer.ggml.model {tok!r} "
                               f"(supported: {', '.join(SUPPORTED_TOKENIZER_MODELS)})")
    tensors = {name: SimpleNamespace(shape=tuple(int(x) for x in reversed(ne))) for name, ne, _, _ in infos}
    emb = tensors.get("token_embd.weight")
    spec = ArchSpec.from_metadata(meta, str(path), tensors, n_vocab=emb.shape[0] if emb is not None else None)
    spec.require("cpu", IMPLEMENTS, str(path))
    return spec
