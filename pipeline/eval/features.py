"""Frozen features of one split, written once as Parquet and streamed back in batches.

Evaluation never holds a split's features in one process. An embedding dataset
(``pipeline.eval.embed.embedding_dataset``: Ray Data batch inference) streams through the driver
once and is written as row groups of ``{id, embedding, label}`` (or, from one pass for
several encoders, one embedding column per encoder) under a temporary location
(a local temp directory, or under the run when the run lives in object storage); the
protocols then read it back batch by batch: kNN streams the bank past its queries, the
linear probe takes its standardisation statistics from one pass and streams shuffled
batches each epoch (shuffled row-group order plus a bounded shuffle buffer).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from pipeline.data import locations
from pipeline.data.shards import open_parquet

ROW_GROUP_ROWS = 8192  # rows per written row group: the unit of reading back and shuffling
FEATURE_FILE = "features.parquet"


def embedding_columns(
    table: pa.Table | pa.RecordBatch, column_name: str = "embedding"
) -> tuple[np.ndarray, np.ndarray]:
    """A {embedding, label} table's float32 features (N, D) and int64 labels (N,); the
    features from the column ``column_name``."""
    column = table.column(column_name)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    features = column.flatten().to_numpy(zero_copy_only=False).reshape(len(table), dim)
    labels = table.column("label").to_numpy().astype(np.int64)
    return features.astype(np.float32, copy=False), labels


@dataclass
class FeatureSplit:
    """One encoder's features of one split: Parquet ``files`` of {id, embedding, label},
    ``rows`` written, the ``rejects`` (id, reason) of rows that could not be decoded, and the
    dimension. ``peak_rows`` is the most rows any read held at once (bounded-memory check).

    The features are the files' ``column``; files written by one multi-encoder pass hold a
    column per encoder, and each encoder's ``FeatureSplit`` reads only its own."""

    files: list[str]
    rows: int
    dim: int
    rejects: list[tuple[str, str]] = field(default_factory=list)
    peak_rows: int = 0
    column: str = "embedding"

    @property
    def rejected(self) -> int:
        """How many rows of the split were rejected (not embedded)."""
        return len(self.rejects)

    def ids_at(self, positions: Iterable[int]) -> dict[int, str]:
        """The ids of rows by position in the unshuffled order of ``batches`` (file by file,
        row group by row group), reading only the id column."""
        wanted = sorted(set(positions))
        found: dict[int, str] = {}
        offset = 0
        for location in self.files:
            parquet = open_parquet(location)
            for group in range(parquet.metadata.num_row_groups):
                size = parquet.metadata.row_group(group).num_rows
                inside = [p for p in wanted if offset <= p < offset + size]
                if inside:
                    ids = parquet.read_row_group(group, columns=["id"]).column("id")
                    found.update({p: ids[p - offset].as_py() for p in inside})
                offset += size
        return found

    def _row_groups(self, gen: torch.Generator | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        units = [
            (location, group)
            for location in self.files
            for group in range(open_parquet(location).metadata.num_row_groups)
        ]
        if gen is not None:
            units = [units[i] for i in torch.randperm(len(units), generator=gen).tolist()]
        opened: dict[str, pq.ParquetFile] = {}
        for location, group in units:
            if location not in opened:
                opened = {location: open_parquet(location)}  # one file open at a time
            table = opened[location].read_row_group(group, columns=[self.column, "label"])
            yield embedding_columns(table, self.column)

    def batches(
        self,
        batch_size: int = 4096,
        *,
        gen: torch.Generator | None = None,
        shuffle_buffer: int = 0,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """(features float32 (B, D), labels int64 (B,)) batches of every row, once.

        With ``gen``, the row groups come in a random order and rows are mixed in a buffer
        of ``shuffle_buffer`` rows (at least one row group's worth is read at a time); the
        last batch may be short, every other one is full."""
        held_x: list[np.ndarray] = []
        held_y: list[np.ndarray] = []
        held = 0
        for x, y in self._row_groups(gen):
            held_x.append(x)
            held_y.append(y)
            held += len(x)
            self.peak_rows = max(self.peak_rows, held)
            if held < (max(shuffle_buffer, batch_size) if gen is not None else batch_size):
                continue
            xs, ys = np.concatenate(held_x), np.concatenate(held_y)
            if gen is not None:
                order = torch.randperm(len(xs), generator=gen).numpy()
                xs, ys = xs[order], ys[order]
            # Emit full batches, keeping half a buffer to mix with the next row groups.
            keep = shuffle_buffer // 2 if gen is not None else 0
            emit = max(0, (len(xs) - keep) // batch_size) * batch_size
            for start in range(0, emit, batch_size):
                yield (
                    torch.from_numpy(xs[start : start + batch_size]),
                    torch.from_numpy(ys[start : start + batch_size]),
                )
            held_x, held_y, held = [xs[emit:]], [ys[emit:]], len(xs) - emit
        if held:
            xs, ys = np.concatenate(held_x), np.concatenate(held_y)
            if gen is not None:
                order = torch.randperm(len(xs), generator=gen).numpy()
                xs, ys = xs[order], ys[order]
            for start in range(0, len(xs), batch_size):
                yield (
                    torch.from_numpy(xs[start : start + batch_size]),
                    torch.from_numpy(ys[start : start + batch_size]),
                )

    def load(self) -> tuple[Tensor, Tensor]:
        """Every row at once: for the query split of kNN (Q x D), never for the bank."""
        parts = list(self.batches(max(1, self.rows)))
        if not parts:
            return torch.zeros(0, self.dim), torch.zeros(0, dtype=torch.int64)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def write_features(
    batches: Iterable[pa.Table],
    out_dir: str,
    *,
    rejects: list[tuple[str, str]] | None = None,
    row_group_rows: int = ROW_GROUP_ROWS,
) -> FeatureSplit:
    """Stream {id, embedding, label} tables (e.g. an embedding dataset's
    ``iter_batches(batch_format="pyarrow")``) into ``out_dir/features.parquet`` (local or a
    URI), ``row_group_rows`` rows per row group; only one row group is held at a time."""
    return write_feature_columns(
        batches, out_dir, ["embedding"], rejects=rejects, row_group_rows=row_group_rows
    )["embedding"]


def write_feature_columns(
    batches: Iterable[pa.Table],
    out_dir: str,
    columns: Sequence[str],
    *,
    rejects: list[tuple[str, str]] | None = None,
    row_group_rows: int = ROW_GROUP_ROWS,
) -> dict[str, FeatureSplit]:
    """``write_features`` for tables of {id, <one embedding column per encoder>, label}
    (``pipeline.eval.embed.embedding_dataset``): one file, ``out_dir/features.parquet``, holding
    every one of ``columns``, and one ``FeatureSplit`` per column reading just that one
    (a row group of a column at a time)."""
    location = locations.join(out_dir, FEATURE_FILE)
    out = _RowGroupWriter(location, row_group_rows)
    schema: pa.Schema | None = None
    rows = 0
    try:
        for table in batches:
            if not len(table):
                continue
            table = table.select(["id", *columns, "label"])
            if schema is None:
                schema = table.schema
            out.add(table.cast(schema))
            rows += len(table)
        out.flush()
    finally:
        out.close()
    return {
        column: FeatureSplit(
            [location] if rows else [],
            rows,
            schema.field(column).type.list_size if schema is not None else 0,
            list(rejects or []),
            column=column,
        )
        for column in columns
    }


class _RowGroupWriter:
    """One Parquet file written row group by row group: added tables are held until they
    reach ``row_group_rows`` rows, so about one row group is in memory at a time. The file
    is created with the first row group (none when nothing is added)."""

    def __init__(self, location: str, row_group_rows: int) -> None:
        self.filesystem, self.path = locations.resolve(location)
        if not locations.is_remote(location):  # object storage needs no directories (nor markers)
            self.filesystem.create_dir(os.path.dirname(self.path) or self.path, recursive=True)
        self.row_group_rows = row_group_rows
        self.writer: pq.ParquetWriter | None = None
        self.pending: list[pa.Table] = []
        self.pending_rows = 0

    def add(self, table: pa.Table) -> None:
        """Hold ``table``; write the held rows once they fill a row group."""
        self.pending.append(table)
        self.pending_rows += len(table)
        if self.pending_rows >= self.row_group_rows:
            self.flush()

    def flush(self) -> None:
        """Write the held rows as one row group."""
        if not self.pending_rows:
            return
        table = pa.concat_tables(self.pending).combine_chunks()
        if self.writer is None:
            # Given the filesystem, the writer owns the stream and closes (uploads) it.
            self.writer = pq.ParquetWriter(self.path, table.schema, filesystem=self.filesystem)
        self.writer.write_table(table, row_group_size=len(table))
        self.pending, self.pending_rows = [], 0

    def close(self) -> None:
        """Finish the file (rows still held and not flushed are dropped)."""
        if self.writer is not None:
            self.writer.close()


@contextlib.contextmanager
def scratch_location(run_dir: str | None) -> Iterator[str]:
    """Where evaluation writes its temporary features: under the run when the run lives in
    object storage (``RUN/eval_scratch/<random>``), else a local temporary directory; its
    files are deleted on exit."""
    if run_dir is not None and locations.is_remote(run_dir):
        root = locations.join(run_dir, "eval_scratch", uuid.uuid4().hex[:12])
        try:
            yield root
        finally:
            with contextlib.suppress(locations.LocationError):
                for entry in locations.list_files(root) if locations.exists(root) else []:
                    locations.delete_file(entry.location)
            filesystem, path = locations.resolve(root)
            with contextlib.suppress(OSError):  # any directory marker a tool left there
                filesystem.delete_dir(path)
    else:
        with tempfile.TemporaryDirectory(prefix="eval-features-") as local:
            yield local
