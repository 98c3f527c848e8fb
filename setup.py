"""Package data that lives outside the package folder (everything else is in pyproject.toml).

The repository keeps the OpenCL kernel sources in the top-level ``opencl/`` and the model registry in
``models/registry.toml`` (beside the git-ignored weights). Both must also ship inside the wheel, so they
are mapped into the package as two data-only packages with setuptools' ``package_dir``:

* ``apr_numba.opencl``   <- ``opencl/``  (``*.cl``; read by ``apr_numba.backends.opencl_kernels.kernel_dir``)
* ``apr_numba.hub.data`` <- ``models/``  (``registry.toml`` only; read by ``apr_numba.hub.registry.registry_path``)

Why a mapping rather than a build hook that copies the files: it is plain setuptools configuration, so
``pip install .``, ``pip wheel .`` and the sdist (package data is included automatically, no MANIFEST.in)
get the files from the one place they are kept, with no copy that could go stale. An editable install (and
``PYTHONPATH`` pointing at a checkout) needs nothing: ``kernel_dir`` and ``registry_path`` look in the checkout
first. This file exists only because pyproject.toml cannot combine package discovery (so that a new subpackage
needs no edit here) with packages mapped from other folders. Discovery is of namespace packages so that data
folders inside the package (``apr_numba/gates/data``) are packages too, as setuptools asks.
"""

from setuptools import find_namespace_packages, setup

DATA_PACKAGES = {"apr_numba.opencl": "opencl", "apr_numba.hub.data": "models"}

setup(
    packages=find_namespace_packages(include=["apr_numba", "apr_numba.*", "tui", "tui.*"], exclude=["*.__pycache__"])
    + list(DATA_PACKAGES),
    package_dir=DATA_PACKAGES,
)
