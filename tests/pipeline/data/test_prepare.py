"""``prepare`` as a Ray Data job: every source kind, local and S3 input and output, bad
images accounted for, the same ids and labels for any parallelism, and resuming after an
interruption."""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data import locations
from pipeline.data.prepare import Progress, default_out, prepare
from pipeline.data.shards import (
    MANIFEST_NAME,
    PARTS_DIR,
    PLAN_NAME,
    ShardError,
    read_parquet,
    shard_files,
)
from pipeline.data.sources import SourceError

RNG = np.random.default_rng(0)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def rgb(size: int = 12) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, size=(size, size, 3), dtype=np.uint8))


def rows(shard_dir: str) -> pa.Table:
    return pa.concat_tables(read_parquet(f) for f in shard_files(shard_dir))


def id_labels(shard_dir: str) -> list[tuple[str, int | None]]:
    table = rows(shard_dir)
    return list(zip(table.column("id").to_pylist(), table.column("label").to_pylist(), strict=True))


def quiet(progress: Progress) -> None:
    pass


def make_folder(root: Path) -> dict[str, set[str]]:
    """Good, odd-mode and bad files; returns the ids of each group."""
    for sub in ("cat", "dog", "dog/deep"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    jpeg = encode(rgb(), "JPEG")
    files = {
        "cat/a.jpg": jpeg,
        "cat/b.png": encode(rgb()),
        "cat/c.jpg": encode(rgb(16), "JPEG"),
        "dog/d.png": encode(rgb(14)),
        "dog/deep/e.jpg": encode(rgb(), "JPEG"),
        "top.png": encode(rgb()),
        # odd modes: converted to 8-bit L or RGB PNG
        "cat/cmyk.jpg": encode(Image.new("CMYK", (10, 10), (0, 255, 255, 0)), "JPEG"),
        "dog/palette.png": encode(_palette_with_transparency()),
        "dog/sixteen.png": encode(Image.fromarray(np.full((9, 9), 40000, np.uint16))),
        "dog/rgba.png": encode(Image.new("RGBA", (8, 8), (0, 200, 0, 128))),
        # bad
        "cat/corrupt.png": RNG.bytes(300),
        "dog/truncated.jpg": jpeg[: len(jpeg) // 2],
        "notes.txt": b"not an image",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    return {
        "good": {"cat/a.jpg", "cat/b.png", "cat/c.jpg", "dog/d.png", "dog/deep/e.jpg", "top.png"},
        "odd": {"cat/cmyk.jpg", "dog/palette.png", "dog/sixteen.png", "dog/rgba.png"},
        "bad": {"cat/corrupt.png", "dog/truncated.jpg", "notes.txt"},
    }


def _palette_with_transparency() -> Image.Image:
    image = rgb(8).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    image.info["transparency"] = 0
    return image


def test_folder_to_s3_same_shards_for_any_parallelism(ray_session, s3_bucket, tmp_path):
    groups = make_folder(tmp_path / "images")
    seen: list[Progress] = []
    out3 = f"{s3_bucket}/shards/x"
    manifest = prepare(
        f"folder:{tmp_path / 'images'}", out3, rows_per_shard=3, tasks=3, progress=seen.append
    )["train"]

    assert manifest.rows == len(groups["good"]) + len(groups["odd"])
    assert set(manifest.skipped) == groups["bad"]
    assert "truncated" in manifest.skipped["dog/truncated.jpg"].lower()
    assert manifest.skipped["cat/corrupt.png"].startswith("UnidentifiedImageError")
    assert manifest.skipped["notes.txt"] == "not an image extension"
    assert (manifest.num_classes, manifest.channels, manifest.image_size) == (2, 3, None)
    # 11 image files in sorted order, 3 per chunk: 4 chunks, each with at least one good image
    assert manifest.shards == [f"part-{i:05d}.parquet" for i in range(4)]
    assert seen[-1].chunks_done == seen[-1].chunks_total == 4
    assert seen[-1].images == manifest.rows and "ETA" in seen[-1].line()

    table = rows(f"{out3}/train")
    by_id = dict(
        zip(table.column("id").to_pylist(), table.column("image").to_pylist(), strict=True)
    )
    assert set(by_id) == groups["good"] | groups["odd"]
    assert by_id["cat/a.jpg"] == (tmp_path / "images/cat/a.jpg").read_bytes()  # passthrough
    for odd in groups["odd"]:
        with Image.open(io.BytesIO(by_id[odd])) as image:
            assert (image.format, image.mode) in {("PNG", "RGB"), ("PNG", "L")}
    with Image.open(io.BytesIO(by_id["dog/sixteen.png"])) as image:
        assert image.mode == "L" and np.asarray(image).max() == 156  # scaled, not clipped
    labels = dict(id_labels(f"{out3}/train"))
    assert labels["cat/a.jpg"] == 0 and labels["dog/deep/e.jpg"] == 1 and labels["top.png"] is None
    # Only shards and the manifest remain: the bookkeeping is removed at the end.
    left = {e.relative for e in locations.list_files(f"{out3}/train")}
    assert left == {MANIFEST_NAME, *manifest.shards}

    out1 = f"{s3_bucket}/shards/one"
    one = prepare(f"folder:{tmp_path / 'images'}", out1, rows_per_shard=3, tasks=1, progress=quiet)
    assert one["train"] == manifest
    assert id_labels(f"{out1}/train") == id_labels(f"{out3}/train")


def test_a_bucket_prefix_of_raw_images_prepares_like_the_local_folder(
    ray_session, s3_bucket, tmp_path
):
    """`prepare folder:s3://bucket/raw/`: listed and read from the bucket, the same rows,
    ids, labels, bytes and skip reasons as the folder on local disk."""
    groups = make_folder(tmp_path / "images")
    for path in sorted((tmp_path / "images").rglob("*")):
        if path.is_file():
            relative = path.relative_to(tmp_path / "images").as_posix()
            locations.write_bytes(f"{s3_bucket}/raw/{relative}", path.read_bytes())
    local = prepare(f"folder:{tmp_path / 'images'}", tmp_path / "local", progress=quiet)
    remote = prepare(f"folder:{s3_bucket}/raw/", f"{s3_bucket}/shards", progress=quiet)
    assert remote["train"].rows == len(groups["good"]) + len(groups["odd"])
    assert remote["train"].skipped == local["train"].skipped
    assert (remote["train"].num_classes, remote["train"].shards) == (
        local["train"].num_classes,
        local["train"].shards,
    )
    same = ["id", "image", "label"]  # each row's "source" names where it came from
    assert (
        rows(f"{s3_bucket}/shards/train")
        .select(same)
        .equals(rows(str(tmp_path / "local" / "train")).select(same))
    )


def _interrupt_after(chunks: int):
    class Interrupted(Exception):
        pass

    def progress(state: Progress) -> None:
        if state.chunks_done - state.chunks_resumed >= chunks:
            raise Interrupted

    return Interrupted, progress


def _part_stamps(split_dir: Path) -> dict[str, int]:
    """mtime of each shard whose chunk record exists (finished chunks)."""
    done = {p.stem for p in (split_dir / "_parts").glob("part-*.json")}
    return {name: (split_dir / f"{name}.parquet").stat().st_mtime_ns for name in done}


def make_plain_folder(root: Path, count: int) -> None:
    for index in range(count):
        sub = root / ("a" if index % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        encode_to = sub / f"{index:03d}.png"
        encode_to.write_bytes(encode(rgb()))


def test_an_interrupted_prepare_resumes_without_redoing_finished_chunks(ray_session, tmp_path):
    make_plain_folder(tmp_path / "images", 12)
    source, out = f"folder:{tmp_path / 'images'}", tmp_path / "out"
    reference = prepare(source, tmp_path / "ref", rows_per_shard=2, progress=quiet)["train"]

    interrupted, stop_after_two = _interrupt_after(2)
    with pytest.raises(interrupted):
        prepare(source, out, rows_per_shard=2, tasks=1, progress=stop_after_two)
    split_dir = out / "train"
    assert not (split_dir / MANIFEST_NAME).exists() and (split_dir / PLAN_NAME).exists()
    finished = _part_stamps(split_dir)
    assert 2 <= len(finished) < 6

    seen: list[Progress] = []
    manifest = prepare(source, out, rows_per_shard=2, tasks=2, progress=seen.append)["train"]
    assert manifest == reference
    assert seen[0].chunks_resumed >= len(finished)
    assert seen[-1].chunks_done == 6
    ids = [i for i, _ in id_labels(str(split_dir))]
    assert len(ids) == len(set(ids)) == 12
    assert id_labels(str(split_dir)) == id_labels(str(tmp_path / "ref" / "train"))
    # the shards finished before the interruption were not written again
    assert {n: (split_dir / f"{n}.parquet").stat().st_mtime_ns for n in finished} == finished
    assert sorted(p.name for p in split_dir.iterdir()) == [MANIFEST_NAME, *manifest.shards]
    # finished now: reused as it is
    assert prepare(source, out, rows_per_shard=2, progress=quiet)["train"] == manifest


@pytest.mark.slow
def test_a_prepare_into_s3_killed_mid_way_and_run_again_gives_the_same_manifest(
    ray_session, s3_bucket, tmp_path
):
    """A real SIGKILL of the `prepare` driver (attached to the session's cluster) while
    chunks land in the bucket; the rerun ends with the uninterrupted run's manifest."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import ray

    make_plain_folder(tmp_path / "images", 160)
    source = f"folder:{tmp_path / 'images'}"
    reference = prepare(source, tmp_path / "ref", rows_per_shard=1, progress=quiet)["train"]
    out = f"{s3_bucket}/shards/killed"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    command = [sys.executable, "-m", "pipeline", "prepare", source, "--out", out]
    driver = subprocess.Popen(
        [*command, "--rows-per-shard", "1", "--tasks", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    records = f"{out}/train/{PARTS_DIR}"
    deadline = time.monotonic() + 120
    while driver.poll() is None and time.monotonic() < deadline:
        if locations.is_dir(records) and len(locations.list_files(records)) >= 5:
            break
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert not locations.exists(f"{out}/train/{MANIFEST_NAME}"), "finished before the kill"
    assert locations.exists(f"{out}/train/{PLAN_NAME}")

    manifest = prepare(source, out, rows_per_shard=1, tasks=2, progress=quiet)["train"]
    assert manifest == reference
    ids = [i for i, _ in id_labels(f"{out}/train")]
    assert len(ids) == len(set(ids)) == 160
    assert id_labels(f"{out}/train") == id_labels(str(tmp_path / "ref" / "train"))
    left = {e.relative for e in locations.list_files(f"{out}/train")}
    assert left == {MANIFEST_NAME, *manifest.shards}


def test_an_unfinished_prepare_of_another_plan_is_refused(ray_session, tmp_path):
    make_plain_folder(tmp_path / "images", 6)
    source, out = f"folder:{tmp_path / 'images'}", tmp_path / "out"
    interrupted, stop = _interrupt_after(1)
    with pytest.raises(interrupted):
        prepare(source, out, rows_per_shard=2, tasks=1, progress=stop)

    (tmp_path / "images" / "a" / "new.png").write_bytes(encode(rgb()))
    with pytest.raises(ShardError, match="different plan.*--overwrite"):
        prepare(source, out, rows_per_shard=2, progress=quiet)
    with pytest.raises(ShardError, match="rows_per_shard 2 -> 3"):
        prepare(source, out, rows_per_shard=3, progress=quiet)
    manifest = prepare(source, out, rows_per_shard=2, overwrite=True, progress=quiet)["train"]
    assert manifest.rows == 7

    (out / "train" / "mine.txt").write_text("keep me")
    with pytest.raises(ShardError, match="not shards"):
        prepare(source, out, rows_per_shard=2, overwrite=True, progress=quiet)
    assert (out / "train" / "mine.txt").read_text() == "keep me"
    assert (out / "train" / MANIFEST_NAME).exists()


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            tar.addfile(info, io.BytesIO(members[name]))


def test_webdataset_tar_shards(ray_session, s3_bucket, tmp_path):
    jpeg = encode(rgb(), "JPEG")
    first = {
        "000.jpg": jpeg,
        "000.cls": b"3",
        "001.jpg": encode(rgb(), "JPEG"),
        "001.cls": b"1\n",
        "002.jpg": jpeg[:40],  # broken image
        "002.cls": b"0",
    }
    second = {
        "x/000.png": encode(Image.new("L", (12, 12), 7)),
        "x/000.cls": b"2",
        "x/001.txt": b"a caption but no image",
        "x/002.jpeg": encode(rgb(), "JPEG"),
    }
    for name, members in (("shard-a.tar", first), ("shard-b.tar", second)):
        buffer = tmp_path / name
        write_tar(buffer, members)
        locations.write_bytes(f"{s3_bucket}/wds/{name}", buffer.read_bytes())

    out = f"{s3_bucket}/shards/wds"
    manifest = prepare(f"tar:{s3_bucket}/wds/", out, progress=quiet)["train"]
    assert id_labels(f"{out}/train") == [
        ("shard-a/000", 3),
        ("shard-a/001", 1),
        ("shard-b/x/000", 2),
        ("shard-b/x/002", None),
    ]
    assert rows(f"{out}/train").column("image").to_pylist()[0] == jpeg
    assert set(manifest.skipped) == {"shard-a/002", "shard-b/x/001"}
    assert "no image" in manifest.skipped["shard-b/x/001"]
    assert manifest.num_classes == 4 and manifest.shards == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]

    # One tar file is a source too; a corrupt one stops prepare with its name.
    local = tmp_path / "local"
    local.mkdir()
    (local / "shard-a.tar").write_bytes((tmp_path / "shard-a.tar").read_bytes())
    (local / "shard-c.tar").write_bytes(b"\x00" * 100 + RNG.bytes(2000))
    single = prepare(f"tar:{local / 'shard-a.tar'}", tmp_path / "one", progress=quiet)["train"]
    assert single.rows == 2
    with pytest.raises(SourceError, match="shard-c.tar"):
        prepare(f"tar:{local}", tmp_path / "bad", progress=quiet)


def test_image_lists_csv_and_parquet_local_and_s3(ray_session, s3_bucket, tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "l1.png").write_bytes(encode(rgb()))
    (tmp_path / "pics" / "l2.jpg").write_bytes(encode(rgb(), "JPEG"))
    locations.write_bytes(f"{s3_bucket}/img/r1.png", encode(rgb()))
    locations.write_bytes(f"{s3_bucket}/img/r2.png", b"broken")
    csv = (
        "uri,label\n"
        "pics/l1.png,zebra\n"
        f"{s3_bucket}/img/r1.png,ant\n"
        f"{tmp_path / 'pics' / 'l2.jpg'},zebra\n"
        f"{s3_bucket}/img/r2.png,\n"
        "pics/missing.png,ant\n"
    )
    (tmp_path / "list.csv").write_text(csv)
    manifest = prepare(f"list:{tmp_path / 'list.csv'}", tmp_path / "out", progress=quiet)["train"]
    assert id_labels(str(tmp_path / "out" / "train")) == [
        ("pics/l1.png", 1),
        (f"{s3_bucket}/img/r1.png", 0),
        (str(tmp_path / "pics" / "l2.jpg"), 1),
    ]
    assert set(manifest.skipped) == {f"{s3_bucket}/img/r2.png", "pics/missing.png"}
    assert manifest.skipped["pics/missing.png"].startswith("FileNotFoundError")

    table = pa.table(
        {
            "path": ["../img/r1.png", str(tmp_path / "pics" / "l1.png")],
            "id": ["remote", "local"],
            "label": pa.array([4, 0], pa.int64()),
        }
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    locations.write_bytes(f"{s3_bucket}/lists/photos.parquet", sink.getvalue().to_pybytes())
    source = f"list:{s3_bucket}/lists/photos.parquet"
    assert str(default_out(source)) == "data/shards/photos"
    prepare(source, f"{s3_bucket}/out", split="val", progress=quiet)
    assert id_labels(f"{s3_bucket}/out/val") == [("remote", 4), ("local", 0)]

    (tmp_path / "nocol.csv").write_text("file\nx.png\n")
    with pytest.raises(SourceError, match="'uri' or 'path'"):
        prepare(f"list:{tmp_path / 'nocol.csv'}", tmp_path / "x", progress=quiet)


def test_parquet_with_hugging_face_image_structs(ray_session, tmp_path):
    images = [encode(rgb(), "JPEG") for _ in range(5)]
    struct_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    data = tmp_path / "hf"
    data.mkdir()
    pq.write_table(
        pa.table(
            {
                "image": pa.array(
                    [{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(images[:3])],
                    struct_type,
                ),
                "label": pa.array([2, -1, 0], pa.int64()),
            }
        ),
        data / "train-00000-of-00002.parquet",
        row_group_size=2,
    )
    pq.write_table(
        pa.table(
            {
                "image": pa.array(
                    [{"bytes": images[3], "path": "3.jpg"}, {"bytes": None, "path": "4.jpg"}],
                    struct_type,
                ),
                "label": pa.array([1, 1], pa.int64()),
            }
        ),
        data / "train-00001-of-00002.parquet",
    )
    manifest = prepare(f"parquet:{data}", tmp_path / "out", rows_per_shard=2, progress=quiet)
    split = manifest["train"]
    assert id_labels(str(tmp_path / "out" / "train")) == [
        ("train-00000-of-00002/000000", 2),
        ("train-00000-of-00002/000001", None),
        ("train-00000-of-00002/000002", 0),
        ("train-00001-of-00002/000000", 1),
    ]
    assert rows(str(tmp_path / "out" / "train")).column("image").to_pylist() == images[:4]
    assert split.skipped == {"train-00001-of-00002/000001": "no image bytes"}
    # the third chunk (the row without bytes) had no image left: no shard for it
    assert split.shards == ["part-00000.parquet", "part-00001.parquet"]


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    path.write_bytes(gzip.compress(header + array.tobytes()))


def test_idx_files_in_parallel_give_stable_ids(ray_session, tmp_path):
    root = tmp_path / "mnist"
    root.mkdir()
    images = {
        s: RNG.integers(0, 256, size=(n, 6, 5), dtype=np.uint8)
        for s, n in (("train", 11), ("t10k", 4))
    }
    labels = {s: RNG.integers(0, 10, size=len(images[s]), dtype=np.uint8) for s in images}
    for prefix in images:
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images[prefix])
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels[prefix])
    many = prepare("mnist", tmp_path / "many", root=root, rows_per_shard=3, tasks=3, progress=quiet)
    one = prepare("mnist", tmp_path / "one", root=root, rows_per_shard=3, tasks=1, progress=quiet)
    assert many == one
    assert (many["train"].rows, many["test"].rows) == (11, 4)
    assert (many["train"].channels, many["train"].image_size) == (1, (6, 5))
    assert len(many["train"].shards) == 4
    train = rows(str(tmp_path / "many" / "train"))
    assert train.column("id").to_pylist() == [f"mnist/train/{i:05d}" for i in range(11)]
    assert train.column("label").to_pylist() == labels["train"].tolist()
    assert train.column("source").to_pylist()[0] == "mnist:train"
    for data, expected in zip(train.column("image").to_pylist(), images["train"], strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), expected)
    assert id_labels(str(tmp_path / "many" / "test")) == id_labels(str(tmp_path / "one" / "test"))


def test_bad_sources_are_refused_before_ray_starts(tmp_path, monkeypatch):
    def no_ray() -> None:
        raise AssertionError("Ray was started for a bad source")

    monkeypatch.setattr("pipeline.cluster.init_ray", no_ray)
    with pytest.raises(SourceError, match="unknown source"):
        prepare("imagenet", tmp_path)
    with pytest.raises(SourceError, match="not found or not a directory"):
        prepare(f"folder:{tmp_path / 'missing'}", tmp_path / "out")
    with pytest.raises(SourceError, match="no .tar file"):
        prepare(f"tar:{tmp_path}", tmp_path / "out")
    assert str(default_out("folder:s3://bucket/raw-images/")) == "data/shards/raw-images"
