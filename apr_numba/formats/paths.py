"""Model paths checked before they are opened."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from apr_numba.errors import ModelFormatError


def check_model_path(path: Path, want_dir: bool | None = None) -> Path:
    """``path`` if it is a regular file or a directory (a model file or a HF model directory), checked with
    ``stat`` before anything opens it: opening a FIFO blocks until a writer comes, a device never ends.

    Args:
        want_dir: True / False to require a directory / a regular file; None accepts either.

    Raises:
        ModelFormatError: missing, or not a regular file / directory (the message names the path and its kind).
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ModelFormatError(f"{path}: no such model file ({e.strerror})") from None
    kind = ("directory" if stat.S_ISDIR(mode) else "regular file" if stat.S_ISREG(mode) else
            "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device" if
            stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special file")
    ok = kind in (("directory",) if want_dir else ("regular file",) if want_dir is False else
                  ("directory", "regular file"))
    if not ok:
        want = "a directory" if want_dir else "a regular file" if want_dir is False else "a model file or directory"
        raise ModelFormatError(f"{path}: is a {kind}, not {want}")
    return path
