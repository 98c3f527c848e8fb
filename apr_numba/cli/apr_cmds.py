"""CLI pieces for the APR v2 format: ``apr-numba import``, ``pull --apr`` and the .apr part of ``inspect``.

Registered in :data:`apr_numba.cli.main.COMMANDS`; errors are :class:`~apr_numba.errors.AprError` subclasses,
printed by ``cli.main`` as one line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def add_import(sub) -> None:
    p = sub.add_parser("import", help="convert a GGUF file or HF safetensors directory to an APR v2 .apr file")
    p.add_argument("source", help="registry name, .gguf file, or directory with config.json, tokenizer.json, "
                                  "model.safetensors")
    p.add_argument("-o", "--output", help="output .apr path (default: the source with suffix .apr)")
    p.add_argument("--json", action="store_true", help="print one JSON object describing the result")


def cmd_import(a) -> int:
    from apr_numba.formats.apr_import import import_model
    from apr_numba.hub.pull import resolve_model

    src = resolve_model(a.source, progress=sys.stderr.isatty())
    r = import_model(src, a.output, progress=sys.stderr.isatty())
    if a.json:
        print(json.dumps({"path": str(r.path), "source": str(src), "tensors": r.tensors,
                          "tensor_bytes": r.tensor_bytes, "file_bytes": r.file_bytes, "seconds": round(r.seconds, 3)}))
    else:
        print(r.path)
        print(f"[apr-numba] {src} -> {r.path}: {r.tensors} tensors, {r.tensor_bytes:,} tensor bytes, "
              f"{r.file_bytes:,} bytes on disk, {r.seconds:.2f}s", file=sys.stderr)
    return 0


def pull_apr(path: Path, force: bool = False) -> Path:
    """The ``.apr`` beside a pulled model (``model.gguf`` -> ``model.apr``, ``dir`` -> ``dir.apr``), imported
    unless one newer than the source with a valid header is already there (or ``force``)."""
    from apr_numba.errors import ModelFormatError
    from apr_numba.formats.apr_format import read_apr
    from apr_numba.formats.apr_import import default_output, import_model

    out = default_output(path)
    if not force and out.is_file() and out.stat().st_mtime >= path.stat().st_mtime:
        try:
            read_apr(out, verify_footer=False)
            return out
        except ModelFormatError:
            pass
    return import_model(path, out, progress=sys.stderr.isatty()).path


def render_apr(apr: dict[str, Any]) -> None:
    """Print the .apr section of ``inspect`` (header fields, flags, checksums, metadata) as rich tables."""
    from rich.console import Console
    from rich.table import Table

    con = Console()
    h = Table(title="APR v2 header", show_header=False)
    for k, v in apr["header"].items():
        h.add_row(k, ", ".join(v) if isinstance(v, list) else str(v))
    for k, v in apr["checksums"].items():
        h.add_row(k, str(v))
    con.print(h)
    m = Table(title="metadata", show_header=False)
    for k, v in apr["metadata"].items():
        m.add_row(k, json.dumps(v, ensure_ascii=False)[:160] if not isinstance(v, str) else v[:160])
    con.print(m)
    t = apr["totals"]
    con.print(f"totals: {t['tensors']} tensors, {t['tensor_bytes']:,} tensor bytes, {t['file_bytes']:,} file bytes")
