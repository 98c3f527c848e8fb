"""Shared fixtures: model paths (pulled on demand), cached GGUF readers and loaded models."""

from __future__ import annotations

import functools

import pytest

from apr_numba.hub.pull import resolve_model

MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b")


@functools.cache
def model_path(name: str):
    return resolve_model(name, progress=False)


@pytest.fixture(scope="session")
def gguf_reader():
    """gguf_reader(name) -> a cached gguf.GGUFReader of the registry model."""
    from gguf import GGUFReader

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = GGUFReader(model_path(name))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def loaded_model():
    """loaded_model(name) -> a cached apr_numba Model (2 threads, n_ctx 512)."""
    from apr_numba.model.decoder import load

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load(name, n_ctx=512)
        return cache[name]

    return get
