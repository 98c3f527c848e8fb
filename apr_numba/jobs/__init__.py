"""Corpus-scale jobs: batch embedding (:func:`embed_corpus`) and batch generation (:func:`generate_batch`),
on this process or on a Ray cluster (``backend="ray"``, the optional extra ``apr-numba[ray]``)."""

from apr_numba.jobs.embed_job import embed_corpus
from apr_numba.jobs.generate_job import generate_batch

__all__ = ["embed_corpus", "generate_batch"]
