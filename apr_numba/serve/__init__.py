"""``apr-numba serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with parallel decode slots.

:mod:`.app` holds the routes, :mod:`.schemas` the pydantic request models, :mod:`.scheduler` the slots and
the engine thread, :mod:`.cli` the command line.
"""
