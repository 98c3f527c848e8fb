"""``apr-numba serve MODEL [--host 127.0.0.1] [--port 8080] [--api-key K] [--parallel N] [--queue N]``.

Binds to 127.0.0.1 unless told otherwise. On SIGTERM / Ctrl-C uvicorn stops accepting connections, lets
in-flight requests finish for ``--shutdown-timeout`` seconds, then the app's shutdown cancels what still
runs (streams end, waiting requests get their result as cancelled) and the engine thread is joined.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from apr_numba.hub.registry import DEFAULT_MODEL


def add_parser(sub) -> None:
    """Register the ``serve`` subcommand on an argparse subparsers object."""
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, ...)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="registry name, .gguf / .apr path, or an encoder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=int, default=8080, help="TCP port (0 = any free port)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--parallel", "-np", type=int, default=4, help="parallel decode slots, each with its own KV cache")
    p.add_argument("--queue", type=int, default=16, help="requests that may wait for a slot before 503")
    p.add_argument("-c", "--ctx-size", "--n-ctx", dest="n_ctx", type=int, default=2048,
                   help="KV positions per slot")
    p.add_argument("-t", "--threads", type=int, default=None, help="kernel threads (default: all cores)")
    p.add_argument("--alias", default=None, help="model id to report (default: the MODEL argument's name)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds in-flight requests may run after SIGTERM")
    p.add_argument("--backend", choices=("auto", "cpu", "opencl"), default="cpu", help="compute backend")
    from apr_numba.quants.vnni_pack import add_activation_arg

    add_activation_arg(p)
    p.add_argument("--blas-threads", type=int, default=1,
                   help="OpenBLAS threads for prefill sgemm (0 = leave as loaded); idle BLAS threads spin against "
                        "the Numba workers (measured: a 21-token prefill 15 s with 2 threads vs 1 s with 1 on 2 "
                        "busy cores)")


def run(a) -> int:
    """Load the model and serve until SIGTERM / SIGINT. Errors propagate as AprError (CLI exit 2)."""
    import uvicorn

    from apr_numba.errors import ArgumentError
    from apr_numba.model.decoder import load
    from apr_numba.serve.app import create_app
    from apr_numba.serve.scheduler import Scheduler

    if a.parallel < 1 or a.queue < 0:
        raise ArgumentError(f"--parallel must be >= 1 and --queue >= 0, got {a.parallel} and {a.queue}")
    if not 0 <= a.port <= 65535:
        raise ArgumentError(f"--port must be in [0, 65535], got {a.port}")
    from apr_numba.hub.pull import resolve_model

    path = resolve_model(a.model)
    if path.is_dir():  # a safetensors directory: an encoder, served for /v1/embeddings
        from apr_numba.encoder.model import load_encoder

        model = load_encoder(path, threads=a.threads)
    else:
        model = load(path, threads=a.threads, n_ctx=a.n_ctx, backend=a.backend)
    if a.blas_threads > 0:
        from threadpoolctl import threadpool_limits

        threadpool_limits(a.blas_threads, user_api="blas")
    name = a.alias or (Path(a.model).stem if Path(a.model).exists() and Path(a.model).is_file() else str(a.model))
    aliases = (model.path.name, model.path.stem, str(a.model))
    if hasattr(model, "eval"):
        scheduler = Scheduler(model, a.parallel, a.queue, a.n_ctx)
    else:
        scheduler = None  # an encoder: embeddings only
    app = create_app(model, name, scheduler, a.api_key, aliases)
    config = uvicorn.Config(app, host=a.host, port=a.port, log_level="warning",
                            timeout_graceful_shutdown=a.shutdown_timeout)
    server = uvicorn.Server(config)
    # uvicorn re-raises the SIGTERM / SIGINT it shut down on once it is done; this handler then exits with 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"[apr-numba] serving {name} ({model.path.name}) on http://{a.host}:{a.port}/v1 with "
          f"{a.parallel if scheduler else 0} slots", file=sys.stderr, flush=True)
    server.run()
    return 0
