"""Corpus job I/O: input formats, shard plans, shard readers and the resumable part store.

A job's input is cut into shards of ``shard_size`` consecutive records (shard k holds records
``[k * shard_size, (k + 1) * shard_size)``). The plan is made in one streaming pass (it stores one byte
offset per shard for line formats, nothing for Parquet, whose row-group sizes are in its footer), so a
shard can be read on its own, by this process or by a Ray read task, without reading the file whole.

Input formats (by suffix):

* ``.parquet`` / ``.pq``: Arrow columns, read with :class:`pyarrow.parquet.ParquetFile` row group by row group.
* ``.jsonl`` / ``.ndjson``: one JSON object per line; blank lines are skipped (not records).
* anything else: plain UTF-8 text, one record per line (every line, blank ones included, is a record).

Every finished shard is one Parquet part file ``part-NNNNNN.parquet`` in ``OUTPUT.parts/``, written to a
temporary name and renamed, so a part that exists is complete. ``manifest.json`` there records the job's
configuration; a restart with the same configuration skips the shards whose parts exist, one with another
configuration is refused. When all parts exist they are merged (one part in memory at a time) into OUTPUT
and the folder is removed.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from apr_numba.errors import ArgumentError

TEXT, JSONL, PARQUET = "text", "jsonl", "parquet"
ROW, SHARD = "_row", "_shard"  # columns every shard table carries: the global record index and the shard index
INSTALL_HINT = "pip install 'apr-numba[ray]'"


def require_pyarrow():
    """Import pyarrow (needed for Parquet and the part store).

    Raises:
        ArgumentError: pyarrow is not installed (the message says how to install it).
    """
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as exc:
        raise ArgumentError("corpus jobs need pyarrow: pip install pyarrow") from exc
    import pyarrow as pa

    return pa


def input_format(path) -> str:
    """``"parquet"``, ``"jsonl"`` or ``"text"`` from the file suffix of ``path``."""
    suffix = Path(path).suffix.lower()
    if suffix in (".parquet", ".pq"):
        return PARQUET
    if suffix in (".jsonl", ".ndjson"):
        return JSONL
    return TEXT


@dataclass(frozen=True)
class Shard:
    """Records ``[start, stop)`` of the input; ``offset`` is the byte offset of record ``start`` and ``line``
    its 1-based line number (line formats; 0 for Parquet)."""

    index: int
    start: int
    stop: int
    offset: int = 0
    line: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _check_input(path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise ArgumentError(f"{path}: input file not found")
    return p


def plan_shards(path, shard_size: int, columns: tuple[str, ...] = ()) -> list[Shard]:
    """Cut the input ``path`` into shards of ``shard_size`` records in one streaming pass.

    ``columns``: for Parquet, columns that must exist (the others are checked per row when read).

    Raises:
        ArgumentError: missing or empty input, shard_size < 1, a Parquet file that cannot be read or lacks a
            column (the columns it has are named).
    """
    p = _check_input(path)
    if int(shard_size) < 1:
        raise ArgumentError(f"shard size must be >= 1, got {shard_size}")
    size = int(shard_size)
    fmt = input_format(p)
    shards: list[Shard] = []
    if fmt == PARQUET:
        pq = require_pyarrow().parquet
        try:
            meta = pq.ParquetFile(p)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid / OSError
            raise ArgumentError(f"{path}: not a readable Parquet file ({exc})") from exc
        names = meta.schema_arrow.names
        for c in columns:
            if c not in names:
                raise ArgumentError(f"{path}: no column {c!r} (columns: {', '.join(names)})")
        n = meta.metadata.num_rows
        shards = [Shard(k, s, min(s + size, n)) for k, s in enumerate(range(0, n, size))]
    else:
        n, offset, line = 0, 0, 0
        with open(p, "rb") as f:
            for raw in f:
                line += 1
                if fmt == TEXT or raw.strip():
                    if n % size == 0:
                        shards.append(Shard(len(shards), n, n + size, offset, line))
                    n += 1
                offset += len(raw)
        if shards:
            last = shards[-1]
            shards[-1] = Shard(last.index, last.start, n, last.offset, last.line)
    if not shards:
        raise ArgumentError(f"{path}: no records (the input is empty)")
    return shards


def _decode(raw: bytes, path, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ArgumentError(f"{path}: line {line}: not UTF-8 ({exc.reason} at byte {exc.start})") from exc


def read_shard(path, shard: Shard, columns: tuple[str, ...] = (), line_key: str = "text") -> list[dict]:
    """The records of ``shard`` as dicts, each with its global index under ``"_row"``.

    Plain-text lines come as ``{line_key: line}`` (the line ending stripped); JSONL lines as the parsed
    object; Parquet rows as ``{column: value}`` for the ``columns`` that exist (all columns if empty).
    Each dict also holds ``"_line"`` (its 1-based line number; 0 for Parquet) for error messages.

    Raises:
        ArgumentError: a line that is not UTF-8, not JSON or not a JSON object (file and line named).
    """
    p = _check_input(path)
    fmt = input_format(p)
    want = shard.stop - shard.start
    rows: list[dict] = []
    if fmt == PARQUET:
        pq = require_pyarrow().parquet
        pf = pq.ParquetFile(p)
        names = pf.schema_arrow.names
        cols = [c for c in columns if c in names] if columns else None
        first, skip, seen = 0, 0, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if seen + n > shard.start:
                first, skip = g, shard.start - seen
                break
            seen += n
        groups = list(range(first, pf.metadata.num_row_groups))
        for batch in pf.iter_batches(batch_size=max(min(want, 8192), 1), row_groups=groups, columns=cols):
            recs = batch.to_pylist()
            if skip:
                recs, skip = recs[skip:], max(skip - len(recs), 0)
            for r in recs[:want - len(rows)]:
                r[ROW], r["_line"] = shard.start + len(rows), 0
                rows.append(r)
            if len(rows) >= want:
                break
        return rows
    line = shard.line - 1
    with open(p, "rb") as f:
        f.seek(shard.offset)
        for raw in f:
            line += 1
            if fmt == TEXT:
                text = _decode(raw, p, line)
                rec = {line_key: text[:-2] if text.endswith("\r\n") else text.rstrip("\n")}
            else:
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw)
                except ValueError as exc:
                    raise ArgumentError(f"{path}: line {line}: not valid JSON ({exc})") from exc
                if not isinstance(rec, dict):
                    raise ArgumentError(f"{path}: line {line}: expected a JSON object, got {type(rec).__name__}")
            rec[ROW], rec["_line"] = shard.start + len(rows), line
            rows.append(rec)
            if len(rows) >= want:
                break
    return rows


def where(path, rec: dict) -> str:
    """``"FILE: line N"`` (line formats) or ``"FILE: row N"`` (Parquet) for an error message about ``rec``."""
    return f"{path}: line {rec['_line']}" if rec.get("_line") else f"{path}: row {rec[ROW]}"


def fingerprint(path) -> dict:
    """Identity of an input file for the manifest: absolute path, size and modification time (ns)."""
    p = Path(path).resolve()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class PartStore:
    """The resumable output of a job: part files in ``OUTPUT.parts/`` plus ``manifest.json``.

    Raises (constructor):
        ArgumentError: OUTPUT exists already (pass ``overwrite=True``), or the parts folder was written by a
            job with another configuration (input, model or options; the differing keys are named).
    """

    def __init__(self, output, config: dict, n_shards: int, overwrite: bool = False):
        self.output = Path(output)
        self.dir = Path(str(self.output) + ".parts")
        self.n_shards = int(n_shards)
        manifest = self.dir / "manifest.json"
        if overwrite:
            shutil.rmtree(self.dir, ignore_errors=True)
        elif self.output.exists() and not self.dir.exists():
            raise ArgumentError(f"{output}: output exists already (pass --overwrite to replace it)")
        config = json.loads(json.dumps(dict(config, n_shards=self.n_shards)))
        if manifest.is_file():
            try:
                old = json.loads(manifest.read_text())["config"]
            except (ValueError, KeyError) as exc:
                raise ArgumentError(f"{manifest}: unreadable manifest (delete {self.dir} to start over)") from exc
            if old != config:
                keys = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
                raise ArgumentError(f"{self.dir}: parts of another job (differs in {', '.join(keys)}); "
                                    f"pass --overwrite or delete the folder")
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(manifest, json.dumps({"version": 1, "config": config}, indent=1).encode())

    def part(self, index: int) -> Path:
        return self.dir / f"part-{index:06d}.parquet"

    def done(self) -> set[int]:
        """Indices of the shards whose part file exists (hence is complete)."""
        out = set()
        for f in self.dir.glob("part-*.parquet"):
            try:
                out.add(int(f.stem.split("-")[1]))
            except ValueError:
                continue
        return out

    def write(self, index: int, table) -> None:
        """Write shard ``index``'s result table (pyarrow) as its part file, atomically."""
        pq = require_pyarrow().parquet
        tmp = self.part(index).with_suffix(".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, self.part(index))

    def tables(self):
        """The part tables in shard order, one at a time (the ``_shard`` column dropped).

        Raises:
            ArgumentError: a part is missing or its columns differ from the first part's.
        """
        pq = require_pyarrow().parquet
        schema = None
        for k in range(self.n_shards):
            if not self.part(k).is_file():
                raise ArgumentError(f"{self.part(k)}: missing part (the job did not finish)")
            t = pq.read_table(self.part(k))
            if SHARD in t.column_names:
                t = t.drop_columns([SHARD])
            if schema is None:
                schema = t.schema
            elif t.schema != schema:
                try:
                    t = t.cast(schema)
                except Exception as exc:  # noqa: BLE001 - ArrowInvalid / NotImplemented
                    raise ArgumentError(f"{self.part(k)}: columns {t.schema} differ from part 0's {schema} "
                                        f"(mixed id types in the input?)") from exc
            yield t

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def merge_parquet(store: PartStore, output: Path) -> int:
    """Concatenate the parts into one Parquet file (one row group per part). Returns the row count."""
    pq = require_pyarrow().parquet
    tmp = output.with_name(output.name + ".tmp")
    writer, n = None, 0
    for t in store.tables():
        if writer is None:
            writer = pq.ParquetWriter(tmp, t.schema)
        writer.write_table(t)
        n += t.num_rows
    writer.close()
    os.replace(tmp, output)
    return n


def merge_jsonl(store: PartStore, output: Path) -> int:
    """Concatenate the parts into a JSONL file (one object per row, UTF-8). Returns the row count."""
    tmp = output.with_name(output.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for t in store.tables():
            for r in t.to_pylist():
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
                n += 1
    os.replace(tmp, output)
    return n
