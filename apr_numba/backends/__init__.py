"""Backends that execute an ArchSpec: the Numba CPU forward, the OpenCL device forward, the float64 NumPy
reference, and the CPU-vs-GPU parity gate that chooses between them.
"""
