"""apr-numba: LLM inference with Numba CPU kernels, parity gates and tracing.

Public API::

    model = apr_numba.load("smollm2-135m")          # or a .gguf / .apr path
    text = apr_numba.generation.generate(model, "Once upon a time", max_tokens=32)
    vecs = apr_numba.embed("minilm-l6", ["a sentence", "another"])  # (2, 384) float32, BERT encoders
    apr_numba.embed_corpus("minilm-l6", "docs.jsonl", "vectors.parquet", backend="local")  # or "ray"
    apr_numba.generate_batch("smollm2-135m", "prompts.jsonl", "out.jsonl", max_tokens=64)
"""

# Numba's cache folder is keyed by the package sources; it must be set before any kernel module is imported
# (Numba reads it when a kernel is decorated), hence before the imports below.
from apr_numba.runtime import configure_cache_dir as _configure_cache_dir

_configure_cache_dir()

from apr_numba.errors import AprError, ArgumentError, ModelFormatError, PullError

# The rest of the public API is imported on first use (PEP 562): `apr-numba run` must not pay for the
# tracing, bisection, encoder and corpus-job modules it never touches (~0.7 s of start-up, issue 14).
_LAZY = {
    "bisect": "apr_numba.debug.bisection",
    "trace": "apr_numba.debug.tracing",
    "embed": "apr_numba.encoder.embedding",
    "EncoderModel": "apr_numba.encoder.model",
    "load_encoder": "apr_numba.encoder.model",
    "create_chat_completion": "apr_numba.generation.completions",
    "create_completion": "apr_numba.generation.completions",
    "GenerationResult": "apr_numba.generation.generate",
    "generate": "apr_numba.generation.generate",
    "run": "apr_numba.generation.generate",
    "embed_corpus": "apr_numba.jobs",
    "generate_batch": "apr_numba.jobs",
    "Model": "apr_numba.model.decoder",
    "load": "apr_numba.model.decoder",
}


def __getattr__(name: str):
    """Import a public name's module on first access (PEP 562); AttributeError for any other name."""
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'apr_numba' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"
__all__ = ["load", "generate", "run", "trace", "bisect", "Model", "GenerationResult", "AprError", "ArgumentError",
           "ModelFormatError", "PullError", "__version__", "embed", "EncoderModel", "load_encoder",
           "create_chat_completion", "create_completion", "embed_corpus", "generate_batch"]
