"""Image sources: planned into chunks on the driver, turned into :class:`ImageRecord` in tasks.

Every source is read in two steps so that ``prepare`` can run as parallel Ray tasks and still
give the same ids and labels whatever the parallelism:

1. A *plan* (:func:`plan_source`), made on the driver: the source is listed into a sorted,
   deterministic list of entries (files, row ranges, tar files), cut into consecutive
   :class:`Chunk` s, each a small JSON-able description (plus raw pixels for IDX/CIFAR,
   which the driver reads once so that workers need no local copy of those files), and a
   fingerprint of all of it.
2. :func:`chunk_records`, run anywhere (a Ray task, or this process): reads one chunk's
   inputs through :mod:`pipeline.data.locations` and yields its records, after checking and,
   where needed, re-encoding every image (:func:`checked_image`).

The sequential readers (:func:`read_idx`, :func:`read_cifar10`, :func:`read_image_folder`,
:func:`read_parquet_images`) are the same two steps in one process.

Sources: MNIST-family IDX files, CIFAR-10 python batches, a folder of images (optionally one
sub-folder per class), Parquet files with an ``image`` column (binary, or a Hugging Face
``{bytes, path}`` struct), WebDataset tar shards and a CSV/Parquet list of image URIs; the
folder, Parquet, tar and list sources may live on local disk or in object storage. A
malformed source raises :class:`SourceError` naming the file and the problem; a single bad
image is skipped instead and recorded in a :class:`SkipCounter` with its reason.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import posixpath
import re
import struct
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from PIL import Image

from pipeline.data import locations

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
MNIST_DIR = Path("/usr/share/datasets/mnist")
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# WebDataset sample members tried, in this order, as the sample's image.
TAR_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
TAR_LABEL_SUFFIXES = ("cls", "label", "class")
# Formats whose bytes are stored unchanged; MPO is the multi-picture JPEG many cameras write.
_PASSTHROUGH_FORMATS = frozenset({"PNG", "JPEG", "MPO"})
_PASSTHROUGH_MODES = frozenset({"L", "RGB"})
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
# Concurrent reads per task for file-per-image sources (object storage is latency-bound).
_READ_THREADS = 8
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


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
        """Record that input ``record_id`` was left out, and why."""
        self.reasons[record_id] = reason

    def __len__(self) -> int:
        return len(self.reasons)


@dataclass(frozen=True)
class Chunk:
    """One unit of work: ``spec`` (JSON-able: ``kind`` and what to read) and, for IDX/CIFAR,
    the raw uint8 pixels of its images. ``work`` sizes it for progress estimates (images, or
    bytes for a tar file)."""

    index: int
    spec: dict[str, Any]
    payload: bytes = b""
    work: int = 0

    def describe(self) -> str:
        """A short name for messages: the chunk's first input."""
        spec = self.spec
        if spec["kind"] == "files":
            return spec["entries"][0][1] if spec["entries"] else "(empty)"
        if spec["kind"] == "parquet":
            return spec["segments"][0][0]
        if spec["kind"] == "tar":
            return spec["location"]
        return f"{spec['prefix']}{spec['start']}.."


@dataclass
class SourcePlan:
    """What ``prepare`` does for one split: its chunks in order, the inputs left out while
    listing (id -> reason) and a fingerprint of the whole plan."""

    source: str
    chunks: list[Chunk]
    skipped: dict[str, str]
    fingerprint: str


def _fingerprint(source: str, rows_per_shard: int, chunks: list[Chunk]) -> str:
    digest = hashlib.sha256(json.dumps([source, rows_per_shard]).encode())
    for chunk in chunks:
        digest.update(json.dumps(chunk.spec, sort_keys=True).encode())
        digest.update(hashlib.sha256(chunk.payload).digest())
    return digest.hexdigest()


def _plan(source: str, rows_per_shard: int, chunks: list[Chunk], skipped=None) -> SourcePlan:
    return SourcePlan(
        source, chunks, dict(skipped or {}), _fingerprint(source, rows_per_shard, chunks)
    )


def _cut(items: list, size: int) -> list[list]:
    if size < 1:
        raise SourceError(f"rows_per_shard must be at least 1, got {size}")
    return [items[start : start + size] for start in range(0, len(items), size)]


# --- images -------------------------------------------------------------------------------


def _encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


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


def checked_image(data: bytes) -> bytes:
    """The bytes to store for one encoded image, after decoding it fully: 8-bit grey or RGB
    JPEG/PNG/MPO unchanged, any other format or mode (CMYK, palette, alpha, 16-bit, ...) as
    8-bit L or RGB PNG. Raises whatever Pillow raises for a corrupt, truncated or
    over-limit (decompression bomb) image."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if image.format in _PASSTHROUGH_FORMATS and image.mode in _PASSTHROUGH_MODES:
            return data
        return _to_png(image)


def skip_reason(exc: BaseException) -> str:
    """``Type: message`` of why an input was skipped, without object addresses (``<_io.BytesIO
    object at 0x7f...>``), so that the same bad file gets the same reason in every run."""
    return f"{type(exc).__name__}: {_ADDRESS.sub('', str(exc))}"


def _checked_record(
    record_id: str, data: bytes | None, label: int | None, source: str, skipped: SkipCounter
) -> ImageRecord | None:
    if data is None:
        skipped.add(record_id, "no image bytes")
        return None
    try:
        encoded = checked_image(data)
    except Exception as exc:  # any decode failure means a bad image, not a crash
        skipped.add(record_id, skip_reason(exc))
        return None
    return ImageRecord(id=record_id, image=encoded, label=label, source=source)


# --- IDX and CIFAR-10: raw pixels read on the driver, PNG-encoded in chunks ----------------


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


def _pixel_chunks(
    images: np.ndarray, labels: list[int] | None, prefix: str, width: int, source: str, size: int
) -> list[Chunk]:
    """Chunks of uint8 images (N, H, W[, C]) whose ids are ``prefix`` + zero-padded index."""
    chunks = []
    for index, start in enumerate(range(0, len(images), max(size, 1))):
        stop = min(start + size, len(images))
        spec = {
            "kind": "pixels",
            "prefix": prefix,
            "width": width,
            "start": start,
            "shape": list(images.shape[1:]),
            "labels": None if labels is None else labels[start:stop],
            "source": source,
        }
        chunks.append(
            Chunk(index, spec, np.ascontiguousarray(images[start:stop]).tobytes(), stop - start)
        )
    return chunks


def plan_idx(
    images_path: Path, labels_path: Path | None, name: str, split: str, rows_per_shard: int
) -> SourcePlan:
    """An MNIST-family pair of IDX files, as chunks of grayscale images."""
    _cut([], rows_per_shard)
    images = read_idx_array(images_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise SourceError(
            f"{images_path}: expected uint8 images of shape (N, H, W), "
            f"found {images.dtype} of shape {images.shape}"
        )
    labels = None
    if labels_path is not None:
        array = read_idx_array(labels_path)
        if array.ndim != 1 or len(array) != len(images):
            raise SourceError(
                f"{labels_path}: expected {len(images)} labels (one per image in "
                f"{images_path}), found shape {array.shape}"
            )
        labels = [int(v) for v in array]
    width = max(5, len(str(len(images) - 1)))
    source = f"{name}:{split}"
    chunks = _pixel_chunks(images, labels, f"{name}/{split}/", width, source, rows_per_shard)
    return _plan(source, rows_per_shard, chunks)


def read_idx(
    images_path: Path, labels_path: Path | None, name: str, split: str
) -> Iterator[ImageRecord]:
    """Yield grayscale PNG records from an MNIST-family pair of IDX files."""
    yield from _sequential(plan_idx(images_path, labels_path, name, split, 4096))


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


def _cifar_dir(root: Path) -> Path:
    nested = root / "cifar-10-batches-py"
    return nested if nested.is_dir() else root


def plan_cifar10(root: Path, split: str, rows_per_shard: int) -> SourcePlan:
    """CIFAR-10 python batches, as chunks of RGB images.

    The batches are pickles, and unpickling runs code chosen by whoever wrote the file:
    only read batches from a trusted source (the official archive). They are unpickled
    here, on the driver, never in the tasks.
    """
    _cut([], rows_per_shard)
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
    images: list[np.ndarray] = []
    labels: list[int] = []
    for name in names:
        path = directory / name
        try:
            with path.open("rb") as f:
                batch = pickle.load(f, encoding="bytes")
        except (OSError, EOFError, pickle.UnpicklingError, ValueError) as exc:
            raise SourceError(f"{path}: cannot unpickle CIFAR-10 batch ({exc})") from exc
        if not isinstance(batch, dict) or not {b"data", b"labels"} <= batch.keys():
            raise SourceError(f"{path}: expected a dict with b'data' and b'labels' keys")
        data, batch_labels = np.asarray(batch[b"data"]), list(batch[b"labels"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise SourceError(
                f"{path}: b'data' must be uint8 of shape (N, 3072), "
                f"found {data.dtype} of shape {data.shape}"
            )
        if len(batch_labels) != len(data):
            raise SourceError(f"{path}: {len(batch_labels)} labels for {len(data)} images")
        # Rows are channel-major (1024 red, 1024 green, 1024 blue); PIL wants HWC.
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.extend(int(label) for label in batch_labels)
    source = f"cifar10:{split}"
    pixels = np.concatenate(images)
    chunks = _pixel_chunks(pixels, labels, f"cifar10/{split}/", 5, source, rows_per_shard)
    return _plan(source, rows_per_shard, chunks)


def read_cifar10(root: Path, split: str) -> Iterator[ImageRecord]:
    """Yield RGB PNG records from the CIFAR-10 python batches (trusted files only)."""
    yield from _sequential(plan_cifar10(root, split, 4096))


def _pixel_records(chunk: Chunk) -> Iterator[ImageRecord]:
    spec = chunk.spec
    images = np.frombuffer(chunk.payload, dtype=np.uint8).reshape(-1, *spec["shape"])
    labels = spec["labels"]
    for offset, image in enumerate(images):
        yield ImageRecord(
            id=f"{spec['prefix']}{spec['start'] + offset:0{spec['width']}d}",
            image=_encode_png(image),
            label=None if labels is None else labels[offset],
            source=spec["source"],
        )


# --- files: an image folder or a list of image URIs ---------------------------------------


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _class_names(relatives: list[str]) -> list[str]:
    nested = (r.split("/") for r in relatives if _is_image_name(r))
    return sorted({parts[0] for parts in nested if len(parts) > 1})


def _folder_listing(root: str) -> list[locations.FileEntry]:
    try:
        if not locations.is_dir(root):
            raise SourceError(f"{root}: image folder not found or not a directory")
        return locations.list_files(root)
    except locations.LocationError as exc:
        raise SourceError(f"{root}: cannot list the image folder ({exc})") from exc


def folder_class_names(root: str | os.PathLike[str]) -> list[str]:
    """Sorted names of the first-level sub-folders of ``root`` that hold image files."""
    return _class_names([e.relative for e in _folder_listing(locations.absolute(root))])


def _file_chunks(entries: list[list], source: str, rows_per_shard: int) -> list[Chunk]:
    """``entries`` are ``[id, location, label, size]``; size is only fingerprinted."""
    return [
        Chunk(index, {"kind": "files", "entries": part, "source": source}, work=len(part))
        for index, part in enumerate(_cut(entries, rows_per_shard))
    ]


def plan_folder(root: str | os.PathLike[str], rows_per_shard: int) -> SourcePlan:
    """An image folder (local or a bucket prefix): every file under it, sorted by relative
    path, which is its id. Images in a first-level sub-folder are labelled with the index of
    that folder's name among :func:`folder_class_names`; images directly under the root are
    unlabelled; files without an image extension are skipped with that reason."""
    root = locations.absolute(root)
    listing = _folder_listing(root)
    class_index = {name: i for i, name in enumerate(_class_names([e.relative for e in listing]))}
    entries, skipped = [], {}
    for entry in listing:
        if not _is_image_name(entry.relative):
            skipped[entry.relative] = "not an image extension"
            continue
        parts = entry.relative.split("/")
        label = class_index[parts[0]] if len(parts) > 1 else None
        entries.append([entry.relative, entry.location, label, entry.size])
    source = f"folder:{root}"
    return _plan(source, rows_per_shard, _file_chunks(entries, source, rows_per_shard), skipped)


def read_image_folder(
    root: str | os.PathLike[str], skipped: SkipCounter | None = None
) -> Iterator[ImageRecord]:
    """Yield records for every decodable image under ``root`` (recursive, sorted); see
    :func:`plan_folder`. Files that are not images or fail to decode go to ``skipped``."""
    yield from _sequential(plan_folder(root, 4096), skipped)


def _list_table(location: str) -> pa.Table:
    try:
        data = locations.read_bytes(location)
    except (OSError, locations.LocationError) as exc:
        raise SourceError(f"{location}: cannot read the image list ({exc})") from exc
    try:
        if location.lower().endswith(".parquet"):
            return pq.read_table(pa.BufferReader(data))
        types = {name: pa.string() for name in ("uri", "path", "id")}
        return pa_csv.read_csv(
            pa.BufferReader(data),
            convert_options=pa_csv.ConvertOptions(column_types=types, strings_can_be_null=True),
        )
    except pa.ArrowException as exc:
        raise SourceError(f"{location}: cannot parse the image list ({exc})") from exc


def _list_labels(location: str, column: pa.ChunkedArray) -> list[int | None]:
    values = column.to_pylist()
    if pa.types.is_integer(column.type):
        bad = [v for v in values if v is not None and v < 0]
        if bad:
            raise SourceError(f"{location}: column 'label' has negative values, e.g. {bad[0]}")
        return values
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise SourceError(
            f"{location}: column 'label' must be integer or string, found {column.type}"
        )
    names = {name: i for i, name in enumerate(sorted({v for v in values if v is not None}))}
    return [None if v is None else names[v] for v in values]


def plan_list(location: str | os.PathLike[str], rows_per_shard: int) -> SourcePlan:
    """A CSV (with a header) or Parquet file listing images: column ``uri`` or ``path`` (a
    local path or URI; relative ones are relative to the list's own directory), optional
    ``label`` (integers, or names numbered in sorted order) and optional ``id`` (else the
    URI as written). The list and the images may be local or in object storage."""
    location = locations.absolute(location)
    table = _list_table(location)
    column = next((c for c in ("uri", "path") if c in table.column_names), None)
    if column is None:
        raise SourceError(
            f"{location}: the image list needs a header with a 'uri' or 'path' column "
            f"(found {table.column_names})"
        )
    uris = [None if v is None else str(v) for v in table.column(column).to_pylist()]
    ids = (
        [None if v is None else str(v) for v in table.column("id").to_pylist()]
        if "id" in table.column_names
        else uris
    )
    labels = (
        _list_labels(location, table.column("label"))
        if "label" in table.column_names
        else [None] * len(uris)
    )
    base = locations.parent(location)
    entries, seen = [], set()
    for row, (uri, record_id, label) in enumerate(zip(uris, ids, labels, strict=True)):
        if not uri or not record_id:
            raise SourceError(f"{location}: row {row} has an empty {column!r} or 'id'")
        if record_id in seen:
            raise SourceError(f"{location}: duplicate id {record_id!r} (row {row})")
        seen.add(record_id)
        if locations.is_uri(uri) or os.path.isabs(uri):
            target = uri
        elif uri.startswith("~"):
            target = locations.absolute(uri)
        else:
            target = _normalised(locations.join(base, *uri.split("/")))
        entries.append([record_id, target, label, None])
    if not entries:
        raise SourceError(f"{location}: the image list is empty")
    source = f"list:{location}"
    return _plan(source, rows_per_shard, _file_chunks(entries, source, rows_per_shard))


def _normalised(location: str) -> str:
    """``a/b/../c`` -> ``a/c``, for local paths and URIs alike."""
    if not locations.is_uri(location):
        return locations.absolute(location)
    scheme, _, rest = location.partition("://")
    bucket, _, key = rest.partition("/")
    return f"{scheme}://{bucket}/{posixpath.normpath(key).lstrip('/')}"


def _read_or_reason(location: str) -> bytes | BaseException:
    try:
        return locations.read_bytes(location)
    except Exception as exc:  # a missing or unreadable file is one bad input
        return exc


def _file_records(chunk: Chunk, skipped: SkipCounter) -> Iterator[ImageRecord]:
    entries, source = chunk.spec["entries"], chunk.spec["source"]
    with ThreadPoolExecutor(min(_READ_THREADS, max(len(entries), 1))) as pool:
        for (record_id, _, label, _), data in zip(
            entries, pool.map(_read_or_reason, [e[1] for e in entries]), strict=True
        ):
            if isinstance(data, BaseException):
                skipped.add(record_id, skip_reason(data))
                continue
            record = _checked_record(record_id, data, label, source, skipped)
            if record is not None:
                yield record


# --- Parquet (our shards, any table with an image column, Hugging Face exports) -----------


def _image_type_ok(found: pa.DataType) -> bool:
    if pa.types.is_binary(found) or pa.types.is_large_binary(found):
        return True
    if pa.types.is_struct(found):  # Hugging Face datasets: {bytes: binary, path: string}
        names = [found.field(i).name for i in range(found.num_fields)]
        return "bytes" in names
    return False


def _check_parquet_schema(path: str, schema: pa.Schema) -> None:
    expected = {
        "id": (pa.types.is_string, pa.types.is_large_string),
        "label": (pa.types.is_integer,),
        "source": (pa.types.is_string, pa.types.is_large_string),
    }
    if "image" not in schema.names:
        raise SourceError(f"{path}: missing required column 'image' (binary)")
    if not _image_type_ok(schema.field("image").type):
        raise SourceError(
            f"{path}: column 'image' must be binary (or a struct with 'bytes'), "
            f"found {schema.field('image').type}"
        )
    for column, checks in expected.items():
        if column in schema.names:
            found = schema.field(column).type
            if not any(check(found) for check in checks):
                wanted = checks[0].__name__.removeprefix("is_")
                raise SourceError(f"{path}: column {column!r} must be {wanted}, found {found}")


def _parquet_stem(location: str) -> str:
    name = locations.name(location)
    return name[: -len(".parquet")] if name.endswith(".parquet") else os.path.splitext(name)[0]


def _parquet_files(location: str) -> list[str]:
    """The Parquet file at ``location``, or the ``*.parquet`` files under it (sorted; names
    starting with ``_`` or ``.`` left out); SourceError when there is none."""
    try:
        if locations.is_file(location):
            files = [location]
        else:
            files = [
                e.location
                for e in locations.list_files(location)
                if e.relative.endswith(".parquet") and not e.relative.startswith(("_", "."))
            ]
    except locations.LocationError as exc:
        raise SourceError(f"{location}: no Parquet file found ({exc})") from exc
    if not files:
        raise SourceError(f"{location}: no Parquet file found")
    return files


def plan_parquet(location: str | os.PathLike[str], rows_per_shard: int) -> SourcePlan:
    """A Parquet file, or a directory / bucket prefix of ``*.parquet`` files (sorted), with
    an ``image`` column (binary, or Hugging Face's ``{bytes, path}`` struct) and optional
    ``id``, ``label`` and ``source``. Id: the ``id`` value, else ``{file stem}/{row:06d}``.
    Rows are cut into chunks of ``rows_per_shard`` across files; only footers (and the
    ``id`` column, to refuse duplicates up front) are read here."""
    _cut([], rows_per_shard)
    location = locations.absolute(location)
    files = _parquet_files(location)
    source = f"parquet:{location}"
    rows: list[tuple[str, int]] = []  # (file, rows)
    seen: dict[str, str] = {}
    for file in files:
        try:
            parquet = _open_parquet(file)
            schema = parquet.schema_arrow
            _check_parquet_schema(file, schema)
            if "id" in schema.names:
                for record_id in parquet.read(columns=["id"]).column("id").to_pylist():
                    if record_id in seen:
                        raise SourceError(
                            f"{file}: duplicate id {record_id!r} (also in {seen[record_id]})"
                        )
                    if record_id is not None:
                        seen[record_id] = file
        except (OSError, pa.ArrowException) as exc:
            raise SourceError(f"{file}: cannot read Parquet file ({exc})") from exc
        rows.append((file, parquet.metadata.num_rows))
    starts, position = [], 0
    for file, count in rows:
        starts.append((file, position, position + count))
        position += count
    chunks = []
    for index, start in enumerate(range(0, position, rows_per_shard)):
        stop = min(start + rows_per_shard, position)
        segments = [
            [file, _parquet_stem(file), max(start, lo) - lo, min(stop, hi) - lo]
            for file, lo, hi in starts
            if lo < stop and hi > start
        ]
        spec = {"kind": "parquet", "segments": segments, "source": source}
        chunks.append(Chunk(index, spec, work=stop - start))
    return _plan(source, rows_per_shard, chunks)


def _open_parquet(location: str) -> pq.ParquetFile:
    filesystem, path = locations.resolve(location)
    return pq.ParquetFile(filesystem.open_input_file(path))


def _parquet_rows(file: str, start: int, stop: int) -> Iterator[tuple[int, dict]]:
    """(row number, row) for rows [start, stop) of a file, reading only their row groups."""
    parquet = _open_parquet(file)
    schema = parquet.schema_arrow
    _check_parquet_schema(file, schema)
    columns = [c for c in ("id", "image", "label", "source") if c in schema.names]
    first = 0
    for group in range(parquet.metadata.num_row_groups):
        count = parquet.metadata.row_group(group).num_rows
        if first < stop and first + count > start:
            table = parquet.read_row_group(group, columns=columns)
            lo, hi = max(start, first) - first, min(stop, first + count) - first
            for offset, row in enumerate(table.slice(lo, hi - lo).to_pylist()):
                yield first + lo + offset, row
        first += count


def _parquet_records(chunk: Chunk, skipped: SkipCounter) -> Iterator[ImageRecord]:
    default_source = chunk.spec["source"]
    for file, stem, start, stop in chunk.spec["segments"]:
        for row, item in _parquet_rows(file, start, stop):
            record_id = item.get("id") or f"{stem}/{row:06d}"
            image = item["image"]
            if isinstance(image, dict):  # Hugging Face {bytes, path}
                image = image.get("bytes")
            label = item.get("label")
            # Hugging Face marks unlabelled rows with -1: no label.
            label = None if label is None or label < 0 else int(label)
            record = _checked_record(
                record_id, image, label, item.get("source") or default_source, skipped
            )
            if record is not None:
                yield record


def read_parquet_images(path: str | os.PathLike[str]) -> Iterator[ImageRecord]:
    """Yield records from a Parquet file, or a directory of ``*.parquet`` files, with images;
    see :func:`plan_parquet`. Unreadable images are left out."""
    yield from _sequential(plan_parquet(path, 4096))


# --- WebDataset tar shards, read by Ray Data's WebDataset datasource ----------------------


def plan_tar(location: str | os.PathLike[str]) -> SourcePlan:
    """WebDataset tar shards: one ``.tar`` file, or a directory / bucket prefix of them
    (sorted). One chunk per tar file; a sample's id is ``{tar name without .tar}/{key}``."""
    location = locations.absolute(location)
    try:
        if locations.is_file(location):
            files = [(location, locations.name(location), _size(location))]
        else:
            files = [
                (e.location, locations.name(e.location), e.size)
                for e in locations.list_files(location)
                if e.relative.endswith(".tar")
            ]
    except locations.LocationError as exc:
        raise SourceError(f"{location}: no tar file found ({exc})") from exc
    if not files:
        raise SourceError(f"{location}: no .tar file found")
    stems = [name.removesuffix(".tar") for _, name, _ in files]
    if len(set(stems)) != len(stems):
        raise SourceError(f"{location}: two tar files share a name; ids would collide")
    source = f"tar:{location}"
    chunks = [
        Chunk(
            index,
            {"kind": "tar", "location": loc, "stem": stem, "size": size, "source": source},
            work=size,
        )
        for index, ((loc, _, size), stem) in enumerate(zip(files, stems, strict=True))
    ]
    return _plan(source, 0, chunks)


def _size(location: str) -> int:
    filesystem, path = locations.resolve(location)
    return filesystem.get_file_info(path).size or 0


def _tar_samples(location: str) -> Iterator[dict[str, Any]]:
    """The samples of one tar file as Ray Data's WebDataset datasource reads them (its
    retrying stream, tar parsing and key grouping), undecoded: ``__key__`` and one bytes
    value per member suffix."""
    import pandas as pd
    from ray.data._internal.datasource.webdataset_datasource import WebDatasetDatasource

    filesystem, path = locations.resolve(location)
    datasource = WebDatasetDatasource(path, decoder=None, filesystem=filesystem)
    for task in datasource.get_read_tasks(1):
        for block in task():
            frame = block if isinstance(block, pd.DataFrame) else block.to_pandas()
            for row in frame.to_dict("records"):
                yield {k: v for k, v in row.items() if isinstance(v, bytes) or k == "__key__"}


def _tar_records(chunk: Chunk, skipped: SkipCounter) -> Iterator[ImageRecord]:
    spec = chunk.spec
    for sample in _tar_samples(spec["location"]):
        record_id = f"{spec['stem']}/{sample['__key__']}"
        suffixes = {k.lower(): k for k in sample if not k.startswith("__")}
        image_key = next((suffixes[s] for s in TAR_IMAGE_SUFFIXES if s in suffixes), None)
        if image_key is None:
            skipped.add(record_id, f"no image in the sample (members: {sorted(suffixes)})")
            continue
        label_key = next((suffixes[s] for s in TAR_LABEL_SUFFIXES if s in suffixes), None)
        label = None
        if label_key is not None:
            text = sample[label_key].decode("utf-8", "replace").strip()
            try:
                label = int(text)
            except ValueError:
                skipped.add(record_id, f"label {text!r} in .{label_key} is not an integer")
                continue
            if label < 0:
                skipped.add(record_id, f"label {label} in .{label_key} is negative")
                continue
        record = _checked_record(record_id, sample[image_key], label, spec["source"], skipped)
        if record is not None:
            yield record


# --- dispatch ------------------------------------------------------------------------------

_CHUNK_READERS = {
    "files": _file_records,
    "parquet": _parquet_records,
    "tar": _tar_records,
}


def chunk_records(chunk: Chunk, skipped: SkipCounter) -> Iterator[ImageRecord]:
    """The records of one chunk, in order; bad images are left out and recorded in
    ``skipped``. Raises SourceError when the chunk's input as a whole cannot be read."""
    kind = chunk.spec["kind"]
    if kind == "pixels":
        return _pixel_records(chunk)
    return _CHUNK_READERS[kind](chunk, skipped)


def _sequential(plan: SourcePlan, skipped: SkipCounter | None = None) -> Iterator[ImageRecord]:
    """A plan read chunk after chunk in this process; listing skips come last."""
    skipped = skipped if skipped is not None else SkipCounter()
    for chunk in plan.chunks:
        yield from chunk_records(chunk, skipped)
    for record_id, reason in plan.skipped.items():
        skipped.add(record_id, reason)
