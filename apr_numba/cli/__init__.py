"""The ``apr-numba`` command line: argument parsing and one module per group of subcommands.
"""
