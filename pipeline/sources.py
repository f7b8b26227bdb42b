"""Image sources turned into a stream of :class:`ImageRecord`.

Every reader yields records lazily, in a deterministic order, with ids that are stable across
runs: MNIST-family IDX files, CIFAR-10 python batches, a folder of images (optionally one
sub-folder per class) and existing Parquet files with an ``image`` column. Malformed inputs
raise :class:`SourceError` naming the file and the problem; in an image folder a single bad
file is skipped instead and recorded in a :class:`SkipCounter`.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
MNIST_DIR = Path("/usr/share/datasets/mnist")
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# Formats whose bytes are stored unchanged; MPO is the multi-picture JPEG many cameras write.
_PASSTHROUGH_FORMATS = frozenset({"PNG", "JPEG", "MPO"})
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class ImageRecord:
    """One image: a stable id, its encoded PNG/JPEG bytes, an optional label and its origin."""

    id: str
    image: bytes
    label: int | None
    source: str


class SourceError(ValueError):
    """An image source is missing or malformed; the message names the file and the problem."""


@dataclass
class SkipCounter:
    """Ids of inputs that were left out, each with the reason (insertion ordered)."""

    reasons: dict[str, str] = field(default_factory=dict)

    def add(self, record_id: str, reason: str) -> None:
        self.reasons[record_id] = reason

    def __len__(self) -> int:
        return len(self.reasons)


def _encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def read_idx_array(path: Path) -> np.ndarray:
    """Parse an IDX file (gzipped or plain) into an array of the dtype its header declares."""
    path = Path(path)
    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise SourceError(f"{path}: cannot read IDX file ({exc})") from exc
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES:
        raise SourceError(f"{path}: not an IDX file (bad magic number {data[:4].hex()!r})")
    ndim = data[3]
    header_size = 4 + 4 * ndim
    if ndim == 0 or len(data) < header_size:
        raise SourceError(f"{path}: IDX header declares {ndim} dims but is truncated or empty")
    dims = struct.unpack(f">{ndim}I", data[4:header_size])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header_size != expected:
        raise SourceError(
            f"{path}: IDX header says shape {dims} ({expected} bytes of data) "
            f"but the file holds {len(data) - header_size} bytes"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def read_idx(
    images_path: Path, labels_path: Path | None, name: str, split: str
) -> Iterator[ImageRecord]:
    """Yield grayscale PNG records from an MNIST-family pair of IDX files."""
    images = read_idx_array(images_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise SourceError(
            f"{images_path}: expected uint8 images of shape (N, H, W), "
            f"found {images.dtype} of shape {images.shape}"
        )
    labels = None
    if labels_path is not None:
        labels = read_idx_array(labels_path)
        if labels.ndim != 1 or len(labels) != len(images):
            raise SourceError(
                f"{labels_path}: expected {len(images)} labels (one per image in "
                f"{images_path}), found shape {labels.shape}"
            )
    width = max(5, len(str(len(images) - 1)))
    for index, image in enumerate(images):
        yield ImageRecord(
            id=f"{name}/{split}/{index:0{width}d}",
            image=_encode_png(image),
            label=None if labels is None else int(labels[index]),
            source=f"{name}:{split}",
        )


def builtin_idx_files(dataset: str, split: str, root: Path | None = None) -> tuple[Path, Path]:
    """Locate the (images, labels) IDX files of a built-in dataset split."""
    defaults = {"fashion-mnist": FASHION_MNIST_DIR, "mnist": MNIST_DIR}
    if dataset not in defaults:
        raise SourceError(f"unknown built-in dataset {dataset!r}; choose one of {sorted(defaults)}")
    if split not in ("train", "test"):
        raise SourceError(f"unknown split {split!r} for {dataset}; choose 'train' or 'test'")
    root = Path(root) if root is not None else defaults[dataset]
    prefix = "train" if split == "train" else "t10k"
    found, missing = [], []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [root / f"{prefix}-{kind}.gz", root / f"{prefix}-{kind}"]
        existing = [p for p in candidates if p.is_file()]
        if existing:
            found.append(existing[0])
        else:
            missing.append(candidates[0].name)
    if missing:
        hint = "pass --root DIR holding the four IDX files (.gz or uncompressed names)"
        if dataset == "fashion-mnist":
            hint = f"`sudo apt-get install -y dataset-fashion-mnist` provides them, or {hint}"
        raise SourceError(f"{dataset} {split}: {', '.join(missing)} not found in {root}; {hint}")
    return found[0], found[1]


def _unlistable(error: OSError) -> None:
    raise SourceError(f"{error.filename}: cannot list directory ({error.strerror})") from error


def _image_files(root: Path) -> list[Path]:
    """Every file under ``root``, sorted by relative path (symlinked directories not followed)."""
    paths = []
    for directory, _, files in os.walk(root, onerror=_unlistable):
        paths.extend(Path(directory, name) for name in files)
    return sorted(paths, key=lambda p: p.relative_to(root).as_posix())


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _class_names(root: Path, paths: list[Path]) -> list[str]:
    nested = (p.relative_to(root).parts for p in paths if _is_image_name(p))
    return sorted({parts[0] for parts in nested if len(parts) > 1})


def folder_class_names(root: Path) -> list[str]:
    """Sorted names of the first-level sub-folders of ``root`` that hold image files."""
    root = Path(root)
    return _class_names(root, _image_files(root))


def _to_png(image: Image.Image) -> bytes:
    """Re-encode a decoded image as 8-bit grayscale or RGB PNG."""
    if image.mode in ("1", "L", "LA", "La"):
        image = image.convert("L")
    elif image.mode.startswith("I") or image.mode == "F":
        # High bit-depth grayscale: scale to 8 bits rather than clip, as convert("L") would.
        pixels = np.asarray(image, dtype=np.float64)
        peak = float(pixels.max(initial=0.0))
        scale = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
        image = Image.fromarray(np.clip(pixels / scale * 255 + 0.5, 0, 255).astype(np.uint8))
    elif image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB").convert("RGB")
    elif image.mode != "RGB":
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def read_image_folder(root: Path, skipped: SkipCounter | None = None) -> Iterator[ImageRecord]:
    """Yield records for every decodable image under ``root`` (recursive, sorted).

    Images in a first-level sub-folder are labelled with the index of that folder's name in
    :func:`folder_class_names`; images directly under ``root`` are unlabelled. Files without
    an image extension and files that fail to decode are recorded in ``skipped``.
    """
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{root}: image folder not found or not a directory")
    paths = _image_files(root)
    class_index = {name: i for i, name in enumerate(_class_names(root, paths))}
    for path in paths:
        relative = path.relative_to(root)
        record_id = relative.as_posix()
        if not _is_image_name(path):
            if skipped is not None:
                skipped.add(record_id, "not an image extension")
            continue
        try:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                encoded = data if image.format in _PASSTHROUGH_FORMATS else _to_png(image)
        except Exception as exc:  # any read or decode failure means a bad file, not a crash
            if skipped is not None:
                skipped.add(record_id, f"{type(exc).__name__}: {exc}")
            continue
        label = class_index.get(relative.parts[0]) if len(relative.parts) > 1 else None
        yield ImageRecord(id=record_id, image=encoded, label=label, source=f"folder:{root}")


def _cifar_dir(root: Path) -> Path:
    nested = root / "cifar-10-batches-py"
    return nested if nested.is_dir() else root


def read_cifar10(root: Path, split: str) -> Iterator[ImageRecord]:
    """Yield RGB PNG records from the CIFAR-10 python batches.

    The batches are pickles, and unpickling runs code chosen by whoever wrote the file:
    only read batches from a trusted source (the official archive).
    """
    if split not in ("train", "test"):
        raise SourceError(f"unknown CIFAR-10 split {split!r}; choose 'train' or 'test'")
    directory = _cifar_dir(Path(root))
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        raise SourceError(
            f"CIFAR-10 {split}: {', '.join(missing)} not found in {directory} "
            "(expected the extracted cifar-10-python.tar.gz)"
        )
    index = 0
    for name in names:
        path = directory / name
        try:
            with path.open("rb") as f:
                batch = pickle.load(f, encoding="bytes")
        except (OSError, EOFError, pickle.UnpicklingError, ValueError) as exc:
            raise SourceError(f"{path}: cannot unpickle CIFAR-10 batch ({exc})") from exc
        if not isinstance(batch, dict) or not {b"data", b"labels"} <= batch.keys():
            raise SourceError(f"{path}: expected a dict with b'data' and b'labels' keys")
        data, labels = np.asarray(batch[b"data"]), list(batch[b"labels"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise SourceError(
                f"{path}: b'data' must be uint8 of shape (N, 3072), "
                f"found {data.dtype} of shape {data.shape}"
            )
        if len(labels) != len(data):
            raise SourceError(f"{path}: {len(labels)} labels for {len(data)} images")
        # Rows are channel-major (1024 red, 1024 green, 1024 blue); PIL wants HWC.
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        for image, label in zip(images, labels, strict=True):
            yield ImageRecord(
                id=f"cifar10/{split}/{index:05d}",
                image=_encode_png(np.ascontiguousarray(image)),
                label=int(label),
                source=f"cifar10:{split}",
            )
            index += 1


def _check_parquet_schema(path: Path, schema: pa.Schema) -> None:
    expected = {
        "image": (pa.types.is_binary, pa.types.is_large_binary),
        "id": (pa.types.is_string, pa.types.is_large_string),
        "label": (pa.types.is_integer,),
        "source": (pa.types.is_string, pa.types.is_large_string),
    }
    if "image" not in schema.names:
        raise SourceError(f"{path}: missing required column 'image' (binary)")
    for column, checks in expected.items():
        if column in schema.names:
            found = schema.field(column).type
            if not any(check(found) for check in checks):
                wanted = checks[0].__name__.removeprefix("is_")
                raise SourceError(f"{path}: column {column!r} must be {wanted}, found {found}")


def read_parquet_images(path: Path) -> Iterator[ImageRecord]:
    """Yield records from a Parquet file, or a directory of ``*.parquet`` files, with images."""
    path = Path(path)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise SourceError(f"{path}: no Parquet file found")
    for file in files:
        try:
            parquet = pq.ParquetFile(file)
        except (OSError, pa.ArrowException) as exc:
            raise SourceError(f"{file}: cannot read Parquet file ({exc})") from exc
        schema = parquet.schema_arrow
        _check_parquet_schema(file, schema)
        columns = [c for c in ("id", "image", "label", "source") if c in schema.names]
        row = 0
        for batch in parquet.iter_batches(batch_size=1024, columns=columns):
            for item in batch.to_pylist():
                record_id = item.get("id") or f"{file.stem}/{row:06d}"
                if item["image"] is None:
                    raise SourceError(f"{file}: row {row} ({record_id}) has a null image")
                yield ImageRecord(
                    id=record_id,
                    image=item["image"],
                    label=item.get("label"),
                    source=item.get("source") or f"parquet:{path}",
                )
                row += 1
