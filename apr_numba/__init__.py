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

from apr_numba.debug.bisection import bisect
from apr_numba.debug.tracing import trace
from apr_numba.encoder.embedding import embed
from apr_numba.encoder.model import EncoderModel, load_encoder
from apr_numba.errors import AprError, ArgumentError, ModelFormatError, PullError
from apr_numba.generation.completions import create_chat_completion, create_completion
from apr_numba.generation.generate import GenerationResult, generate, run
from apr_numba.jobs import embed_corpus, generate_batch
from apr_numba.model.decoder import Model, load

__version__ = "0.1.0"
__all__ = ["load", "generate", "run", "trace", "bisect", "Model", "GenerationResult", "AprError", "ArgumentError",
           "ModelFormatError", "PullError", "__version__", "embed", "EncoderModel", "load_encoder",
           "create_chat_completion", "create_completion", "embed_corpus", "generate_batch"]
