"""Tests for pipeline.data.shards: writing, caching, reading back and validating shards."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data.shards import (
    MANIFEST_NAME,
    SHARD_SCHEMA,
    ShardError,
    load_manifest,
    manifest_from_parts,
    part_name,
    read_labels,
    remove_shards,
    shard_files,
    validate_shards,
    write_part,
    write_shards,
)
from pipeline.data.sources import ImageRecord, SkipCounter


def png(value: int, size: tuple[int, int] = (4, 5), mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (size[1], size[0]), value).save(buffer, format="PNG")
    return buffer.getvalue()


def make_records(n: int = 50) -> list[ImageRecord]:
    return [
        ImageRecord(f"toy/{i:05d}", png(i), None if i % 7 == 0 else i % 3, "toy:train")
        for i in range(n)
    ]


class Untouchable:
    """An iterable that fails the test if anything tries to read it."""

    def __iter__(self) -> Iterator[ImageRecord]:
        raise AssertionError("records were read although the shards were cached")


def read_back(shard_dir: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in shard_files(shard_dir))


def test_write_shards_round_trip(tmp_path: Path) -> None:
    records = make_records()
    out = tmp_path / "shards"
    manifest = write_shards(records, out, rows_per_shard=16, source="toy")

    assert manifest.rows == 50
    assert manifest.shards == [f"part-{i:05d}.parquet" for i in range(4)]
    assert (manifest.num_classes, manifest.channels, manifest.image_size) == (3, 1, (4, 5))
    assert (manifest.source, manifest.skipped) == ("toy", {})
    assert load_manifest(out) == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]  # no temp dir left
    assert [pq.ParquetFile(p).metadata.num_rows for p in shard_files(out)] == [16, 16, 16, 2]
    assert all(Path(p).is_absolute() for p in shard_files(out))

    table = read_back(out)
    assert table.schema == SHARD_SCHEMA
    assert table.column("id").to_pylist() == [r.id for r in records]
    assert table.column("image").to_pylist() == [r.image for r in records]
    assert table.column("label").to_pylist() == [r.label for r in records]
    assert set(table.column("source").to_pylist()) == {"toy:train"}

    ids, labels = read_labels(out)
    assert ids == [r.id for r in records]
    assert labels.dtype == np.int64
    assert labels.tolist() == [-1 if r.label is None else r.label for r in records]
    assert validate_shards(out) == manifest


def test_write_shards_is_cached_unless_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "shards"
    first = write_shards(make_records(), out, rows_per_shard=16)
    assert write_shards(Untouchable(), out) == first

    again = write_shards(iter(make_records(5)), out, overwrite=True)
    assert (again.rows, again.shards) == (5, ["part-00000.parquet"])
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "part-00000.parquet"]


def test_write_shards_fills_an_existing_empty_directory(tmp_path: Path) -> None:
    assert write_shards(make_records(3), tmp_path).rows == 3
    assert load_manifest(tmp_path).shards == ["part-00000.parquet"]


def test_write_shards_rejects_duplicates_and_leaves_nothing(tmp_path: Path) -> None:
    records = make_records(5)
    out = tmp_path / "shards"
    with pytest.raises(ShardError, match="duplicate id 'toy/00002'"):
        write_shards([*records, records[2]], out)
    assert list(tmp_path.iterdir()) == []


def test_write_shards_refuses_foreign_directories(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ShardError, match="overwrite=True"):
        write_shards(make_records(2), tmp_path)
    with pytest.raises(ShardError, match="not shards"):
        write_shards(make_records(2), tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_write_shards_records_skips_and_image_properties(tmp_path: Path) -> None:
    upstream = SkipCounter()
    upstream.add("gone.png", "UnidentifiedImageError: nope")
    records = [
        ImageRecord("a", png(1, (4, 4), "RGB"), None, "x"),
        ImageRecord("b", b"not an image", 1, "x"),
        ImageRecord("c", png(2, (8, 8)), None, "y"),
    ]
    manifest = write_shards(records, tmp_path / "out", skipped=upstream)
    assert manifest.rows == 2
    assert (manifest.num_classes, manifest.channels, manifest.image_size) == (None, 3, None)
    assert manifest.source == "x, y"
    assert list(manifest.skipped) == ["gone.png", "b"]
    assert manifest.skipped["b"].startswith("UnidentifiedImageError")
    ids, labels = read_labels(tmp_path / "out")
    assert (ids, labels.tolist()) == (["a", "c"], [-1, -1])


def test_manifest_and_shard_files_errors(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match=MANIFEST_NAME):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text('{"rows": 1}')
    with pytest.raises(ShardError, match="invalid manifest"):
        load_manifest(tmp_path)
    good = write_shards(make_records(3), tmp_path / "ok")
    (tmp_path / MANIFEST_NAME).write_text(good.to_json().replace('"channels": 1', '"channels": 2'))
    with pytest.raises(ShardError, match="wrong type"):
        load_manifest(tmp_path)
    out = tmp_path / "shards"
    write_shards(make_records(3), out)
    (out / "part-00000.parquet").unlink()
    with pytest.raises(ShardError, match="part-00000.parquet"):
        shard_files(out)


def write_table(path: Path, columns: dict[str, pa.Array]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def test_validate_shards_reports_every_problem(tmp_path: Path) -> None:
    write_table(tmp_path / "no_image.parquet", {"id": pa.array(["a"])})
    write_table(tmp_path / "str_image.parquet", {"id": ["b"], "image": ["png?"]})
    write_table(tmp_path / "str_label.parquet", {"id": ["c"], "image": [b"x"], "label": ["cat"]})
    write_table(tmp_path / "dup.parquet", {"id": ["a"], "image": [b"x"]})
    with pytest.raises(ShardError) as excinfo:
        validate_shards(tmp_path)
    message = str(excinfo.value)
    assert "no_image.parquet: missing column 'image'" in message
    assert "str_image.parquet: column 'image' must be binary, found string" in message
    assert "str_label.parquet: column 'label' must be integer, found string" in message
    assert "duplicate id 'a'" in message

    with pytest.raises(ShardError, match="str_image.parquet: column 'image'"):
        validate_shards(tmp_path / "str_image.parquet")


def test_validate_shards_accepts_good_data_and_checks_manifest(tmp_path: Path) -> None:
    single = write_table(
        tmp_path / "one.parquet",
        {"id": ["a"], "image": pa.array([b"x"], pa.large_binary()), "label": [3]},
    )
    assert validate_shards(single) is None
    out = tmp_path / "shards"
    manifest = write_shards(make_records(20), out, rows_per_shard=8)
    assert validate_shards(out) == manifest
    (out / MANIFEST_NAME).write_text(manifest.to_json().replace('"rows": 20', '"rows": 21'))
    with pytest.raises(ShardError, match="says 21 rows, the files hold 20"):
        validate_shards(out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="no .parquet files"):
        validate_shards(tmp_path / "empty")


def test_write_part_stops_at_its_limit_and_writes_nothing_when_empty(tmp_path: Path) -> None:
    records = iter(make_records(5))
    skipped = SkipCounter()
    first = write_part(records, str(tmp_path / part_name(0)), skipped=skipped, limit=3)
    assert (first.shard, first.rows, first.sizes, first.all_gray) == (
        part_name(0),
        3,
        [(4, 5)],
        True,
    )
    assert [r.id for r in records] == ["toy/00003", "toy/00004"]  # the rest is left unread
    bad = [ImageRecord("x", b"nope", None, "t")]
    empty = write_part(iter(bad), str(tmp_path / part_name(1)), skipped=skipped)
    assert empty.shard is None and not (tmp_path / part_name(1)).exists()
    assert list(skipped.reasons) == ["x"]
    manifest = manifest_from_parts([first, empty], "toy", skipped.reasons)
    assert (manifest.rows, manifest.shards, manifest.num_classes) == (3, [part_name(0)], 3)


def test_remove_shards_deletes_only_shard_directories(tmp_path: Path) -> None:
    out = tmp_path / "shards"
    write_shards(make_records(3), out)
    (out / "_parts").mkdir()
    (out / "_parts" / "part-00000.json").write_text("{}")
    remove_shards(str(out))
    assert [p for p in out.rglob("*") if p.is_file()] == []
    write_shards(make_records(3), out, overwrite=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ShardError, match="not shards"):
        remove_shards(str(out))
    assert (out / MANIFEST_NAME).exists() and (out / "notes.txt").exists()
