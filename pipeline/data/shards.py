"""Parquet shards: the canonical training format, written once by ``prepare``.

A shard directory (a local directory or an object-storage prefix) holds
``part-00000.parquet``, ``part-00001.parquet``, ... (columns ``id``, ``image``, ``label``,
``source``) and a ``manifest.json`` describing them. The manifest is always written last, so
a directory with a manifest is a finished dataset; writing again is then a no-op unless
``overwrite`` is asked for. :func:`write_part` writes one shard file (``prepare``'s tasks call
it once per chunk, :func:`write_shards` once per shard in a single process) and
:func:`manifest_from_parts` merges what the parts hold into the manifest.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from pipeline.data import locations
from pipeline.data.sources import ImageRecord, SkipCounter, skip_reason

SHARD_SCHEMA = pa.schema(
    [("id", pa.string()), ("image", pa.binary()), ("label", pa.int32()), ("source", pa.string())]
)
MANIFEST_NAME = "manifest.json"
ROW_GROUP_SIZE = 1024
_MAX_PROBLEMS_SHOWN = 50
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


class ShardError(ValueError):
    """Shards or their manifest are missing or malformed; the message names file and problem."""


@dataclass
class ShardManifest:
    """What a shard directory holds, written as ``manifest.json`` next to the shards."""

    rows: int
    shards: list[str]
    num_classes: int | None
    channels: int
    image_size: tuple[int, int] | None
    source: str
    skipped: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        """The manifest as indented JSON, as ``manifest.json`` holds it."""
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, origin: str) -> ShardManifest:
        """Parse and type-check a manifest; ``origin`` names the file in errors."""
        try:
            raw: Any = json.loads(text)
            size = raw["image_size"]
            manifest = cls(
                rows=raw["rows"],
                shards=raw["shards"],
                num_classes=raw["num_classes"],
                channels=raw["channels"],
                image_size=None if size is None else tuple(size),
                source=raw["source"],
                skipped=raw["skipped"],
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ShardError(f"{origin}: invalid manifest ({type(exc).__name__}: {exc})") from exc
        valid = (
            isinstance(manifest.rows, int)
            and isinstance(manifest.shards, list)
            and all(isinstance(name, str) for name in manifest.shards)
            and (manifest.num_classes is None or isinstance(manifest.num_classes, int))
            and manifest.channels in (1, 3)
            and (size is None or (len(size) == 2 and all(isinstance(v, int) for v in size)))
            and isinstance(manifest.source, str)
            and isinstance(manifest.skipped, dict)
        )
        if not valid:
            raise ShardError(f"{origin}: invalid manifest (a field has the wrong type)")
        return manifest


def load_manifest(shard_dir: str | os.PathLike[str]) -> ShardManifest:
    """Read ``shard_dir/manifest.json`` (a local directory or an object-storage prefix)."""
    path = locations.join(shard_dir, MANIFEST_NAME)
    try:
        text = locations.read_text(path)
    except (OSError, locations.LocationError) as exc:
        raise ShardError(f"{path}: no readable manifest; prepare the shards first ({exc})") from exc
    return ShardManifest.from_json(text, path)


def shard_files(shard_dir: str | os.PathLike[str]) -> list[str]:
    """The manifest's shard files as absolute locations, in order; all must exist."""
    shard_dir = locations.absolute(shard_dir)
    names = load_manifest(shard_dir).shards
    present = {entry.relative for entry in locations.list_files(shard_dir, recursive=False)}
    missing = [name for name in names if name not in present]
    if missing:
        raise ShardError(f"{shard_dir}: shard files listed in the manifest are missing: {missing}")
    return [locations.join(shard_dir, name) for name in names]


def open_parquet(location: str) -> pq.ParquetFile:
    """A Parquet file at a local path or in object storage, opened for reading."""
    filesystem, path = locations.resolve(location)
    return pq.ParquetFile(filesystem.open_input_file(path))


def read_parquet(location: str, columns: list[str] | None = None) -> pa.Table:
    """A whole Parquet file (or the given columns) at a local path or in object storage."""
    filesystem, path = locations.resolve(location)
    return pq.read_table(path, columns=columns, filesystem=filesystem)


def part_name(index: int) -> str:
    """The file name of shard number ``index``: ``part-00003.parquet``."""
    return f"part-{index:05d}.parquet"


@dataclass
class PartStats:
    """What one shard file holds, as merged into the manifest: its name (None when no row was
    written, and then no file either), rows, distinct (height, width) sizes, whether every
    image is grayscale, the largest label (-1 when none) and the distinct row sources."""

    shard: str | None
    rows: int = 0
    sizes: list[tuple[int, int]] = field(default_factory=list)
    all_gray: bool = True
    max_label: int = -1
    sources: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The stats as plain values, to travel from a prepare task to the driver."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PartStats:
        """The stats back from ``to_dict``'s values."""
        return cls(
            shard=raw["shard"],
            rows=int(raw["rows"]),
            sizes=[(int(h), int(w)) for h, w in raw["sizes"]],
            all_gray=bool(raw["all_gray"]),
            max_label=int(raw["max_label"]),
            sources=list(raw["sources"]),
        )


def _write_row_group(writer: pq.ParquetWriter, records: list[ImageRecord]) -> None:
    columns = {name: [getattr(r, name) for r in records] for name in SHARD_SCHEMA.names}
    writer.write_table(pa.Table.from_pydict(columns, schema=SHARD_SCHEMA))


def _image_header(
    record: ImageRecord, seen: set[str], skipped: SkipCounter
) -> tuple[tuple[int, int], str] | None:
    """The (height, width) and mode of a record's image, once its id and label are checked
    (ShardError if not); None, with the reason added to ``skipped``, if the header is
    unreadable."""
    if record.id in seen:
        raise ShardError(f"duplicate id {record.id!r} (source {record.source})")
    if record.label is not None and not 0 <= record.label < 2**31:
        raise ShardError(f"{record.id}: label {record.label} is not in [0, 2**31)")
    try:
        with Image.open(io.BytesIO(record.image)) as header:
            return (header.height, header.width), header.mode
    except Exception as exc:  # unreadable bytes: leave the row out, keep the reason
        skipped.add(record.id, skip_reason(exc))
        return None


def _flush_rows(
    writer: pq.ParquetWriter | None, sink: pa.BufferOutputStream, records: list[ImageRecord]
) -> pq.ParquetWriter:
    """Write ``records`` as one row group, opening the writer on ``sink`` at the first."""
    if writer is None:
        writer = _parquet_writer(sink)
    _write_row_group(writer, records)
    return writer


def write_part(
    records: Iterator[ImageRecord],
    location: str | os.PathLike[str],
    *,
    skipped: SkipCounter,
    limit: int | None = None,
    seen: set[str] | None = None,
) -> PartStats:
    """Write records from ``records`` as one Parquet shard at ``location`` (local or object
    storage; the file appears whole or not at all) and return what it holds.

    Stops after ``limit`` rows when given (the rest of the iterator is left unread). Records
    whose image header cannot be read are left out and added to ``skipped``. Raises ShardError
    on a duplicate id (within the part, or already in ``seen``) or a label outside
    [0, 2**31). When no record is written, no file is written and ``shard`` is None. The
    shard is built in memory (one shard's worth of encoded images) and uploaded at the end.
    """
    seen = seen if seen is not None else set()
    stats = PartStats(shard=None)
    sizes: set[tuple[int, int]] = set()
    sources: set[str] = set()
    buffer = pa.BufferOutputStream()
    writer: pq.ParquetWriter | None = None
    pending: list[ImageRecord] = []
    try:
        for record in records:
            header = _image_header(record, seen, skipped)
            if header is None:
                continue
            size, mode = header
            seen.add(record.id)
            sizes.add(size)
            sources.add(record.source)
            stats.all_gray = stats.all_gray and mode in _GRAY_MODES
            stats.max_label = max(stats.max_label, -1 if record.label is None else record.label)
            stats.rows += 1
            pending.append(record)
            if len(pending) == ROW_GROUP_SIZE:
                writer = _flush_rows(writer, buffer, pending)
                pending = []
            if limit is not None and stats.rows == limit:
                break
        if pending:
            writer = _flush_rows(writer, buffer, pending)
    finally:
        if writer is not None:
            writer.close()
    if stats.rows:
        locations.write_bytes(location, buffer.getvalue())
        stats.shard = locations.name(location)
    stats.sizes, stats.sources = sorted(sizes), sorted(sources)
    return stats


def _parquet_writer(sink: pa.BufferOutputStream) -> pq.ParquetWriter:
    return pq.ParquetWriter(
        sink,
        SHARD_SCHEMA,
        compression="none",  # PNG/JPEG bytes are already compressed
        use_dictionary=["source"],
        write_statistics=["id", "label"],  # min/max of image blobs would bloat footers
    )


def manifest_from_parts(
    parts: Iterable[PartStats], source: str, skipped: dict[str, str]
) -> ShardManifest:
    """The manifest of the shards described by ``parts`` (in shard order)."""
    parts = list(parts)
    sizes = {(height, width) for part in parts for height, width in part.sizes}
    sources = {name for part in parts for name in part.sources}
    max_label = max((part.max_label for part in parts), default=-1)
    return ShardManifest(
        rows=sum(part.rows for part in parts),
        shards=[part.shard for part in parts if part.shard is not None],
        num_classes=max_label + 1 if max_label >= 0 else None,
        channels=1 if all(part.all_gray for part in parts) else 3,
        image_size=sizes.pop() if len(sizes) == 1 else None,
        source=source or (", ".join(sorted(sources)) if len(sources) <= 3 else "mixed"),
        skipped=dict(skipped),
    )


# Bookkeeping of an unfinished ``prepare`` next to its shards (removed once it finishes).
PLAN_NAME = "_prepare.json"
PARTS_DIR = "_parts"


def _own_file(relative: str) -> bool:
    """A file a shard directory may hold: shards, the manifest, prepare's bookkeeping, and
    the temporary names of any of them that a crash left behind."""
    name = relative.split(".tmp-")[0]
    return (
        name in (MANIFEST_NAME, PLAN_NAME)
        or (name.startswith("part-") and name.endswith(".parquet"))
        or (name.startswith(f"{PARTS_DIR}/part-") and name.endswith(".json"))
    )


def _replaceable(location: str | os.PathLike[str]) -> bool:
    """True if ``location`` holds nothing but shard files, so deleting it loses nothing else."""
    return all(_own_file(e.relative) for e in locations.list_files(location))


def remove_shards(location: str | os.PathLike[str]) -> None:
    """Delete a shard directory's files, the manifest first (so no half-deleted directory
    ever looks complete). Refuses (ShardError) when it holds files that are not shards."""
    if not locations.exists(location):
        return
    entries = locations.list_files(location)
    foreign = [e.relative for e in entries if not _own_file(e.relative)]
    if foreign:
        raise ShardError(
            f"{location}: refusing to overwrite, it holds files that are not shards: {foreign[:5]}"
        )
    for entry in sorted(entries, key=lambda e: e.relative != MANIFEST_NAME):
        locations.delete_file(entry.location)


def _existing_shards(out_dir: Path, overwrite: bool) -> ShardManifest | None:
    """The manifest of a complete dataset already at ``out_dir`` that ``overwrite`` leaves
    alone, else None; ShardError when ``out_dir`` holds something that must not be replaced."""
    if out_dir.is_dir() and not overwrite and any(out_dir.iterdir()):
        try:
            shard_files(out_dir)
            return load_manifest(out_dir)
        except ShardError as exc:
            raise ShardError(
                f"{out_dir} exists but is not a complete shard directory; "
                f"pass overwrite=True to replace it ({exc})"
            ) from exc
    if out_dir.exists() and not (out_dir.is_dir() and _replaceable(str(out_dir))):
        raise ShardError(f"{out_dir}: refusing to overwrite, it holds files that are not shards")
    return None


def _write_parts(
    records: Iterable[ImageRecord], directory: Path, rows_per_shard: int, skipped: SkipCounter
) -> list[PartStats]:
    """Write ``records`` as shards of ``rows_per_shard`` rows into ``directory``, in order."""
    remaining = iter(records)
    seen: set[str] = set()
    parts: list[PartStats] = []
    while True:
        part = write_part(
            remaining,
            str(directory / part_name(len(parts))),
            skipped=skipped,
            limit=rows_per_shard,
            seen=seen,
        )
        if part.shard is None:
            break
        parts.append(part)
        if part.rows < rows_per_shard:
            break
    return parts


def write_shards(
    records: Iterable[ImageRecord],
    out_dir: Path,
    *,
    rows_per_shard: int = 4096,
    source: str = "",
    skipped: SkipCounter | None = None,
    overwrite: bool = False,
) -> ShardManifest:
    """Write ``records`` as Parquet shards plus manifest under the local ``out_dir``, in this
    process; return the manifest (``prepare`` is the parallel, object-storage-aware way).

    If ``out_dir`` already holds a valid dataset and ``overwrite`` is false, its manifest is
    returned and ``records`` is not touched. Records whose image header cannot be read are
    skipped; the manifest lists them together with whatever ``skipped`` collected upstream.
    Raises ShardError on a duplicate id, a negative label, or when no record is left to write;
    nothing is then left behind under ``out_dir``. The directory is built under a temporary
    sibling name and renamed into place when complete.
    """
    out_dir = Path(out_dir)
    if rows_per_shard < 1:
        raise ShardError(f"rows_per_shard must be at least 1, got {rows_per_shard}")
    existing = _existing_shards(out_dir, overwrite)
    if existing is not None:
        return existing
    skipped = skipped if skipped is not None else SkipCounter()
    tmp_dir = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        parts = _write_parts(records, tmp_dir, rows_per_shard, skipped)
        if not parts:
            raise ShardError(f"{out_dir}: no records to write ({len(skipped)} skipped)")
        manifest = manifest_from_parts(parts, source, skipped.reasons)
        # The manifest goes in last, so a directory with one always has every shard.
        (tmp_dir / MANIFEST_NAME).write_text(manifest.to_json())
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp_dir.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return manifest


_COLUMN_TYPES = {
    "id": ("string", (pa.types.is_string, pa.types.is_large_string)),
    "image": ("binary", (pa.types.is_binary, pa.types.is_large_binary)),
    "label": ("integer", (pa.types.is_integer,)),
    "source": ("string", (pa.types.is_string, pa.types.is_large_string)),
}


def _schema_problems(file_name: str, schema: pa.Schema) -> list[str]:
    """A shard file's missing required columns and columns of the wrong type."""
    problems = []
    for column, (wanted, checks) in _COLUMN_TYPES.items():
        if column not in schema.names:
            if column in ("id", "image"):
                problems.append(f"{file_name}: missing column {column!r} ({wanted})")
        elif not any(check(schema.field(column).type) for check in checks):
            found = schema.field(column).type
            problems.append(f"{file_name}: column {column!r} must be {wanted}, found {found}")
    return problems


def _manifest_problems(manifest: ShardManifest, files: list[str], rows: int) -> list[str]:
    """Where the manifest disagrees with the shard ``files`` found, holding ``rows`` rows."""
    problems = []
    missing = sorted(set(manifest.shards) - {locations.name(f) for f in files})
    if missing:
        problems.append(f"{MANIFEST_NAME}: lists shard files that do not exist: {missing}")
    if manifest.rows != rows:
        problems.append(f"{MANIFEST_NAME}: says {manifest.rows} rows, the files hold {rows}")
    return problems


def validate_shards(path: str | os.PathLike[str]) -> ShardManifest | None:
    """Check a shard directory or prefix (or one Parquet file); raise ShardError listing every
    problem. Returns the directory's manifest, or None when there is none (or ``path`` is a
    file)."""
    path = locations.absolute(path)
    try:
        single = locations.is_file(path)
        entries = [] if single else locations.list_files(path, recursive=False)
    except locations.LocationError as exc:
        raise ShardError(f"{path}: no such file or directory ({exc})") from exc
    files = [path] if single else [e.location for e in entries if e.relative.endswith(".parquet")]
    if not files:
        raise ShardError(f"{path}: no .parquet files")
    problems: list[str] = []
    first_file: dict[str, str] = {}
    rows = 0
    for file in files:
        file_name = locations.name(file)
        try:
            parquet = open_parquet(file)
        except (OSError, pa.ArrowException) as exc:
            problems.append(f"{file_name}: unreadable Parquet file ({exc})")
            continue
        schema = parquet.schema_arrow
        problems += _schema_problems(file_name, schema)
        rows += parquet.metadata.num_rows
        if "id" not in schema.names:
            continue
        for record_id in parquet.read(columns=["id"]).column("id").to_pylist():
            if record_id is None:
                problems.append(f"{file_name}: column 'id' has a null value")
            elif record_id in first_file:
                problems.append(
                    f"{file_name}: duplicate id {record_id!r} (also in {first_file[record_id]})"
                )
            else:
                first_file[record_id] = file_name
    manifest = None
    if not single and any(e.relative == MANIFEST_NAME for e in entries):
        manifest = load_manifest(path)
        problems += _manifest_problems(manifest, files, rows)
    if problems:
        shown = problems[:_MAX_PROBLEMS_SHOWN]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more problems")
        raise ShardError(f"{path}: invalid shards:\n  " + "\n  ".join(shown))
    return manifest


def read_labels(shard_dir: str | os.PathLike[str]) -> tuple[list[str], np.ndarray]:
    """Ids and labels (int64, -1 where null or absent) of every row, in shard order."""
    ids: list[str] = []
    labels: list[np.ndarray] = []
    for location in shard_files(shard_dir):
        names = open_parquet(location).schema_arrow.names
        table = read_parquet(location, [c for c in ("id", "label") if c in names])
        ids.extend(table.column("id").to_pylist())
        if "label" in names:
            filled = pc.fill_null(table.column("label"), -1)
            labels.append(filled.to_numpy().astype(np.int64))
        else:
            labels.append(np.full(table.num_rows, -1, dtype=np.int64))
    return ids, np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
