"""The Numba kernels. Importing the package starts Numba's thread pool first (:func:`apr_numba.runtime.launch_threads`:
a cached kernel may reach a parallel one without the hook that would start it)."""

from apr_numba.runtime import launch_threads as _launch_threads

_launch_threads()
