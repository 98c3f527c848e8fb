"""The ``.verified`` stamp of a pulled model: what lets a present model skip the full SHA-256 hash.

A stamp (``<models>/.verified/<path>.json``) records, per file: size, ``st_mtime_ns``, ``st_ctime_ns``,
``st_ino`` and the SHA-256 of eight 4 KiB blocks sampled at fixed fractions of the file (first and last
block included), next to the expected (just verified) SHA-256. A check costs one ``stat`` and eight
small reads (well under a millisecond), against seconds for a full hash of a large model.

Why these: size and mtime alone are defeated by a byte flipped and the mtime put back with
``os.utime``. The *ctime* is not settable from user space: any write, and the ``utime`` call that
restores the mtime, set it to "now", so a modified file never keeps its stamped ctime (short of
changing the system clock or writing the raw device). The inode catches a file replaced by another
one (copy, rename over). The sampled blocks are a second, content-based guard that also holds on file
systems with coarse or missing ctimes. A changed file is not rejected on these facts: it is hashed in
full, and only a SHA-256 mismatch refuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

STAMP_DIR = ".verified"
_BLOCK = 4096
_SAMPLES = 8

__all__ = ["STAMP_DIR", "drop_stamp", "sample_hash", "stamp_ok", "write_stamp"]


def sample_hash(path: Path, size: int) -> str:
    """SHA-256 (hex) of ``_SAMPLES`` blocks of ``_BLOCK`` bytes at offsets i/(n-1) of the file, i = 0..n-1."""
    h = hashlib.sha256()
    last = max(size - _BLOCK, 0)
    with open(path, "rb") as f:
        for i in range(_SAMPLES):
            f.seek(last * i // (_SAMPLES - 1))
            h.update(f.read(_BLOCK))
    return h.hexdigest()


def _facts(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino,
            "sample": sample_hash(path, st.st_size)}


def _stamp_path(entry: Any, root: Path) -> Path:
    return root / STAMP_DIR / f"{entry.path}.json"


def write_stamp(entry: Any, root: Path) -> None:
    """Record the facts above and the (expected, just verified) SHA-256 of each file; best effort."""
    try:
        files = {entry.display_name(spec): {**_facts(entry.file_path(spec, root)), "sha256": spec.sha256}
                 for spec in entry.files}
    except OSError:
        return
    sp = _stamp_path(entry, root)
    try:
        sp.parent.mkdir(parents=True, exist_ok=True)
        tmp = sp.with_name(f"{sp.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"model": entry.name, "files": files}, indent=1) + "\n")
        os.replace(tmp, sp)
    except OSError:
        pass


def drop_stamp(entry: Any, root: Path) -> None:
    try:
        _stamp_path(entry, root).unlink()
    except OSError:
        pass


def stamp_ok(entry: Any, root: Path) -> bool:
    """Whether the stamp matches every file's size, mtime, ctime, inode, sampled blocks and expected SHA-256."""
    try:
        data = json.loads(_stamp_path(entry, root).read_text())
    except (OSError, ValueError, RecursionError):
        return False
    stamp = data.get("files", {}) if isinstance(data, dict) else {}
    if not isinstance(stamp, dict):
        return False
    for spec in entry.files:
        rec = stamp.get(entry.display_name(spec))
        if not isinstance(rec, dict) or rec.get("sha256") != spec.sha256:
            return False
        try:
            facts = _facts(entry.file_path(spec, root))
        except OSError:
            return False
        if any(rec.get(k) != v for k, v in facts.items()):
            return False
    return True
