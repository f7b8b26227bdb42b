"""Tests for pipeline.data.sources: every reader on tiny hand-made files."""

from __future__ import annotations

import gzip
import io
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data.sources import (
    SkipCounter,
    SourceError,
    builtin_idx_files,
    checked_image,
    chunk_records,
    folder_class_names,
    plan_folder,
    plan_list,
    plan_tar,
    read_cifar10,
    read_idx,
    read_idx_array,
    read_image_folder,
    read_parquet_images,
)


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_idx(path: Path, array: np.ndarray, code: int = 0x08, gz: bool = False) -> Path:
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trips_pixels_labels_and_ids(tmp_path: Path, gz: bool) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(3, 4, 5), dtype=np.uint8)
    labels = np.array([7, 0, 3], dtype=np.uint8)
    records = list(
        read_idx(
            write_idx(tmp_path / "images", images, gz=gz),
            write_idx(tmp_path / "labels", labels, gz=gz),
            "toy",
            "train",
        )
    )
    assert [r.id for r in records] == ["toy/train/00000", "toy/train/00001", "toy/train/00002"]
    assert [r.label for r in records] == [7, 0, 3]
    assert {r.source for r in records} == {"toy:train"}
    for record, image in zip(records, images, strict=True):
        assert record.image.startswith(b"\x89PNG")
        np.testing.assert_array_equal(decode(record.image), image)


def test_read_idx_without_labels_and_wide_ids(tmp_path: Path) -> None:
    images = np.zeros((100_001, 1, 1), dtype=np.uint8)
    first = next(read_idx(write_idx(tmp_path / "images", images), None, "big", "test"))
    assert (first.id, first.label, first.source) == ("big/test/000000", None, "big:test")


def test_read_idx_array_keeps_header_dtype(tmp_path: Path) -> None:
    values = np.array([[-2, 300], [7, -32000]], dtype=np.int16)
    array = read_idx_array(write_idx(tmp_path / "shorts", values, code=0x0B))
    assert array.dtype == np.int16
    np.testing.assert_array_equal(array, values)


def test_read_idx_rejects_malformed_files(tmp_path: Path) -> None:
    good = write_idx(tmp_path / "good", np.zeros((2, 3, 3), dtype=np.uint8)).read_bytes()
    cases = {
        "magic": b"\x08\x03" + good[2:],
        "truncated": good[:-1],
        "extra": good + b"\0",
        "badgzip": gzip.compress(good)[:-8],
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(SourceError, match=re.escape(str(path))):
            read_idx_array(path)
    labels = write_idx(tmp_path / "labels", np.zeros(3, dtype=np.uint8))
    with pytest.raises(SourceError, match="expected 2 labels"):
        list(read_idx(tmp_path / "good", labels, "toy", "train"))


def test_builtin_idx_files(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="dataset-fashion-mnist") as excinfo:
        builtin_idx_files("fashion-mnist", "train", root=tmp_path)
    assert "--root" in str(excinfo.value)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"")
    assert builtin_idx_files("mnist", "test", root=tmp_path) == (
        tmp_path / "t10k-images-idx3-ubyte.gz",
        tmp_path / "t10k-labels-idx1-ubyte",
    )
    with pytest.raises(SourceError, match="split"):
        builtin_idx_files("mnist", "val", root=tmp_path)


def test_read_image_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
    for sub in ("cat", "dog/sub", "notes"):
        (tmp_path / sub).mkdir(parents=True)
    Image.fromarray(rgb).save(tmp_path / "cat/a.png")
    Image.fromarray(rgb).save(tmp_path / "cat/b.JPG", format="JPEG")
    Image.fromarray(rgb).save(tmp_path / "dog/c.bmp")
    Image.fromarray(np.array([[0, 65535]], dtype=np.uint16)).save(tmp_path / "dog/sub/d.tif")
    palette = Image.fromarray(rgb).convert("P")
    palette.save(tmp_path / "dog/e.gif")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "top.png")
    (tmp_path / "dog/bad.png").write_bytes(rng.bytes(200))
    noise = png_bytes(rng.integers(0, 256, size=(64, 64), dtype=np.uint8))
    (tmp_path / "cat/trunc.png").write_bytes(noise[: len(noise) // 2])
    (tmp_path / "notes/readme.txt").write_text("not an image")

    skipped = SkipCounter()
    records = list(read_image_folder(tmp_path, skipped))

    assert folder_class_names(tmp_path) == ["cat", "dog"]
    assert [(r.id, r.label) for r in records] == [
        ("cat/a.png", 0),
        ("cat/b.JPG", 0),
        ("dog/c.bmp", 1),
        ("dog/e.gif", 1),
        ("dog/sub/d.tif", 1),
        ("top.png", None),
    ]
    assert {r.source for r in records} == {f"folder:{tmp_path}"}
    by_id = {r.id: r for r in records}
    assert by_id["cat/a.png"].image == (tmp_path / "cat/a.png").read_bytes()
    assert by_id["cat/b.JPG"].image == (tmp_path / "cat/b.JPG").read_bytes()
    assert by_id["dog/c.bmp"].image.startswith(b"\x89PNG")
    np.testing.assert_array_equal(decode(by_id["dog/c.bmp"].image), rgb)
    np.testing.assert_array_equal(decode(by_id["dog/sub/d.tif"].image), [[0, 255]])
    np.testing.assert_array_equal(decode(by_id["dog/e.gif"].image), palette.convert("RGB"))
    assert list(skipped.reasons) == ["cat/trunc.png", "dog/bad.png", "notes/readme.txt"]
    assert "truncated" in skipped.reasons["cat/trunc.png"]
    assert skipped.reasons["dog/bad.png"].startswith("UnidentifiedImageError")
    assert skipped.reasons["notes/readme.txt"] == "not an image extension"
    assert len(skipped) == 3
    assert list(read_image_folder(tmp_path)) == records


def test_read_image_folder_without_classes(tmp_path: Path) -> None:
    Image.new("L", (2, 2)).save(tmp_path / "x.png")
    assert [(r.id, r.label) for r in read_image_folder(tmp_path)] == [("x.png", None)]
    with pytest.raises(SourceError, match="not a directory"):
        list(read_image_folder(tmp_path / "missing"))


def write_cifar_batch(path: Path, data: np.ndarray, labels: list[int]) -> None:
    with path.open("wb") as f:
        pickle.dump({b"batch_label": b"x", b"data": data, b"labels": labels}, f)


@pytest.mark.parametrize("nested", [False, True])
def test_read_cifar10(tmp_path: Path, nested: bool) -> None:
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    images = np.random.default_rng(2).integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    planar = images.transpose(0, 3, 1, 2).reshape(12, 3072)  # the on-disk channel-major rows
    for i in range(5):
        write_cifar_batch(directory / f"data_batch_{i + 1}", planar[2 * i : 2 * i + 2], [i, i])
    write_cifar_batch(directory / "test_batch", planar[10:], [8, 9])

    train = list(read_cifar10(directory if nested else tmp_path, "train"))
    assert [r.id for r in train] == [f"cifar10/train/{i:05d}" for i in range(10)]
    assert [r.label for r in train] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    for record, image in zip(train, images[:10], strict=True):
        np.testing.assert_array_equal(decode(record.image), image)
    test = list(read_cifar10(tmp_path, "test"))
    assert [(r.id, r.label, r.source) for r in test] == [
        ("cifar10/test/00000", 8, "cifar10:test"),
        ("cifar10/test/00001", 9, "cifar10:test"),
    ]
    np.testing.assert_array_equal(decode(test[1].image), images[11])


def test_read_cifar10_rejects_bad_batches(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="test_batch not found"):
        list(read_cifar10(tmp_path, "test"))
    write_cifar_batch(tmp_path / "test_batch", np.zeros((2, 1024), dtype=np.uint8), [0, 1])
    with pytest.raises(SourceError, match="test_batch.*3072"):
        list(read_cifar10(tmp_path, "test"))
    write_cifar_batch(tmp_path / "test_batch", np.zeros((2, 3072), dtype=np.uint8), [0])
    with pytest.raises(SourceError, match="1 labels for 2 images"):
        list(read_cifar10(tmp_path, "test"))


def test_read_parquet_images(tmp_path: Path) -> None:
    images = [png_bytes(np.full((2, 2), i, dtype=np.uint8)) for i in range(3)]
    pq.write_table(
        pa.table({"image": images, "label": pa.array([1, None, 2], pa.int64())}),
        tmp_path / "a.parquet",
    )
    pq.write_table(
        pa.table({"id": ["x"], "image": images[:1], "source": ["cam"]}), tmp_path / "b.parquet"
    )
    records = list(read_parquet_images(tmp_path))
    assert [(r.id, r.label, r.source) for r in records] == [
        ("a/000000", 1, f"parquet:{tmp_path}"),
        ("a/000001", None, f"parquet:{tmp_path}"),
        ("a/000002", 2, f"parquet:{tmp_path}"),
        ("x", None, "cam"),
    ]
    assert [r.image for r in records] == [*images, images[0]]
    assert len(list(read_parquet_images(tmp_path / "b.parquet"))) == 1


@pytest.mark.parametrize(
    ("table", "match"),
    [
        (pa.table({"image": ["not bytes"]}), "column 'image' must be binary"),
        (pa.table({"id": ["a"]}), "missing required column 'image'"),
        (pa.table({"image": [b"x"], "label": ["cat"]}), "column 'label' must be integer"),
    ],
)
def test_read_parquet_images_rejects_bad_schema(
    tmp_path: Path, table: pa.Table, match: str
) -> None:
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    with pytest.raises(SourceError, match=match) as excinfo:
        list(read_parquet_images(path))
    assert str(path) in str(excinfo.value)


def test_checked_image_keeps_8_bit_jpeg_and_png_and_converts_odd_modes() -> None:
    rgb = np.random.default_rng(3).integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
    jpeg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(rgb).save(jpeg, format="JPEG")
    Image.fromarray(rgb).save(png, format="PNG")
    assert checked_image(jpeg.getvalue()) == jpeg.getvalue()
    assert checked_image(png.getvalue()) == png.getvalue()
    rgba = io.BytesIO()
    Image.new("RGBA", (3, 3), (1, 2, 3, 4)).save(rgba, format="PNG")
    with Image.open(io.BytesIO(checked_image(rgba.getvalue()))) as image:
        assert (image.format, image.mode) == ("PNG", "RGB")
    with pytest.raises(OSError):
        checked_image(jpeg.getvalue()[:40])


def test_plans_cut_sources_into_chunks_with_stable_fingerprints(tmp_path: Path) -> None:
    for index in range(5):
        (tmp_path / "img" / "k").mkdir(parents=True, exist_ok=True)
        Image.new("L", (2, 2), index).save(tmp_path / "img" / "k" / f"{index}.png")
    (tmp_path / "img" / "readme.md").write_text("x")
    plan = plan_folder(tmp_path / "img", 2)
    assert [len(c.spec["entries"]) for c in plan.chunks] == [2, 2, 1]
    assert plan.skipped == {"readme.md": "not an image extension"}
    assert plan.fingerprint == plan_folder(tmp_path / "img", 2).fingerprint
    assert plan.fingerprint != plan_folder(tmp_path / "img", 3).fingerprint
    (tmp_path / "img" / "k" / "4.png").write_bytes(png_bytes(np.zeros((3, 3), np.uint8)))
    assert plan.fingerprint != plan_folder(tmp_path / "img", 2).fingerprint
    skipped = SkipCounter()
    records = [r for c in plan.chunks for r in chunk_records(c, skipped)]
    assert [(r.id, r.label) for r in records] == [(f"k/{i}.png", 0) for i in range(5)]


def test_plan_list_labels_ids_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "list.csv").write_text(
        "path,label,id\n../a.png,dog,1\n/abs/b.png,cat,2\nc.png,,3\n"
    )
    plan = plan_list(tmp_path / "sub" / "list.csv", 10)
    assert plan.chunks[0].spec["entries"] == [
        ["1", str(tmp_path / "a.png"), 1, None],
        ["2", "/abs/b.png", 0, None],
        ["3", str(tmp_path / "sub" / "c.png"), None, None],
    ]
    (tmp_path / "dup.csv").write_text("uri\na.png\na.png\n")
    with pytest.raises(SourceError, match="duplicate id 'a.png'"):
        plan_list(tmp_path / "dup.csv", 10)


def test_tar_samples_are_read_by_ray_datas_webdataset_reader(tmp_path: Path) -> None:
    import tarfile

    members = {"k1.png": png_bytes(np.zeros((2, 2), np.uint8)), "k1.cls": b"4", "k2.cls": b"1"}
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    plan = plan_tar(tmp_path / "s.tar")
    skipped = SkipCounter()
    records = list(chunk_records(plan.chunks[0], skipped))
    assert [(r.id, r.label) for r in records] == [("s/k1", 4)]
    assert list(skipped.reasons) == ["s/k2"]
