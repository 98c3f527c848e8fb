"""Package data that lives outside the package folder (everything else is in pyproject.toml).

The repository keeps the OpenCL kernel sources in the top-level ``opencl/`` and the model registry in
``models/registry.toml`` (beside the git-ignored weights). Both must also ship inside the wheel, so they
are mapped into the package as two data-only packages with setuptools' ``package_dir``:

* ``apr_numba.opencl``   <- ``opencl/``  (``*.cl``; read by ``apr_numba.backends.opencl_kernels.kernel_dir``)
* ``apr_numba.hub.data`` <- ``models/``  (``registry.toml`` only; read by ``apr_numba.hub.registry.registry_path``)

Why a mapping rather than a build hook that copies the files: it is plain setuptools configuration, so
``pip install .``, ``pip wheel .``, the sdist (package data is included automatically, no MANIFEST.in) and
editable installs (setuptools' editable finder maps the two names onto the same folders) all get the files
from the one place they are kept, with no copy that could go stale. This file exists only because
pyproject.toml cannot combine ``packages.find`` (so that a new subpackage needs no edit here) with packages
mapped from other folders.
"""

from setuptools import find_packages, setup

DATA_PACKAGES = {"apr_numba.opencl": "opencl", "apr_numba.hub.data": "models"}

setup(
    packages=find_packages(include=["apr_numba", "apr_numba.*", "tui", "tui.*"]) + list(DATA_PACKAGES),
    package_dir=DATA_PACKAGES,
)
