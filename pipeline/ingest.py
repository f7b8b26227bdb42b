"""The Ray Data side: Parquet shards -> decoded images -> random uint8 views, streamed to Train.

The dataset is lazy, so each epoch re-runs decode and augmentation and every view is drawn
afresh. Views stay uint8 until the training device, where ``normalize`` casts them.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray.data
import torch
from PIL import Image, ImageOps
from ray.data.expressions import col

from pipeline.augment import ViewRecipe, random_views
from pipeline.shards import ShardManifest, load_manifest, read_labels, shard_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageSpec:
    """What every decoded image is made into: ``channels`` x ``size`` x ``size`` uint8."""

    size: int
    channels: int

    @classmethod
    def from_manifest(cls, manifest: ShardManifest, size: int | None) -> ImageSpec:
        if size is None:
            if manifest.image_size is None or manifest.image_size[0] != manifest.image_size[1]:
                raise ValueError(
                    f"shards from {manifest.source!r} have no single square image size "
                    f"({manifest.image_size}); set data.image_size"
                )
            size = manifest.image_size[0]
        return cls(size=size, channels=manifest.channels)


def decode_image(data: bytes, spec: ImageSpec) -> np.ndarray:
    """Decode PNG/JPEG bytes to (channels, size, size) uint8; resize + centre-crop if needed."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        img = img.convert("L" if spec.channels == 1 else "RGB")
    if img.size != (spec.size, spec.size):
        img = ImageOps.fit(img, (spec.size, spec.size), Image.Resampling.BICUBIC)
    array = np.asarray(img, dtype=np.uint8)
    return array[None] if spec.channels == 1 else array.transpose(2, 0, 1)


def decode_batch(ids: np.ndarray, images: np.ndarray, spec: ImageSpec) -> tuple[list, np.ndarray]:
    """Decode a batch; undecodable rows are dropped and logged with their id and reason."""
    kept_ids, arrays = [], []
    for image_id, data in zip(ids, images, strict=True):
        try:
            arrays.append(decode_image(data, spec))
            kept_ids.append(image_id)
        except Exception as err:  # noqa: BLE001 - any decoder failure rejects just this row
            log.warning("rejected image %s: %s: %s", image_id, type(err).__name__, err)
    shape = (0, spec.channels, spec.size, spec.size)
    return kept_ids, np.stack(arrays) if arrays else np.zeros(shape, np.uint8)


def augment_batch(
    batch: dict[str, np.ndarray], spec: ImageSpec, recipe: ViewRecipe, num_views: int
) -> dict[str, np.ndarray]:
    """Ray Data batch function: {id, image bytes} -> {id, view_0, view_1, ...} uint8."""
    torch.set_num_threads(1)
    ids, pixels = decode_batch(batch["id"], batch["image"], spec)
    # Fresh OS entropy per batch: views differ across workers and epochs by construction.
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
    tensor = torch.from_numpy(pixels)
    out: dict[str, np.ndarray] = {"id": np.asarray(ids, dtype=object)}
    for index in range(num_views):
        out[f"view_{index}"] = random_views(tensor, recipe, gen).numpy()
    return out


def _files_for_limit(shard_dir: Path, limit: int | None) -> tuple[list[str], list[str]]:
    """The shard files holding the first ``limit`` rows, and the ids past the limit in the
    last of them. Ray's own ``limit`` keeps whichever rows arrive first, which would change
    the training subset from epoch to epoch."""
    files, rows = [], 0
    for path in shard_files(shard_dir):
        if limit is not None and rows >= limit:
            break
        files.append(str(path))
        rows += pq.ParquetFile(path).metadata.num_rows
    if limit is None or rows <= limit:
        return files, []
    last_ids = pq.read_table(files[-1], columns=["id"]).column("id").to_pylist()
    return files, last_ids[len(last_ids) - (rows - limit) :]


def training_dataset(
    shard_dir: str | Path,
    spec: ImageSpec,
    recipe: ViewRecipe,
    *,
    num_views: int = 2,
    limit: int | None = None,
    decode_tasks: int = 2,
    batch_size: int = 256,
) -> ray.data.Dataset:
    """Lazy Ray dataset of augmented views for pretraining (labels are never read)."""
    files, beyond_limit = _files_for_limit(Path(shard_dir), limit)
    # One read task per file: the first views stream out after one file, not the whole set.
    ds = ray.data.read_parquet(files, override_num_blocks=len(files)).select_columns(
        ["id", "image"]
    )
    if beyond_limit:
        ds = ds.filter(expr=col("id").not_in(beyond_limit))
    return ds.map_batches(
        augment_batch,
        fn_kwargs={"spec": spec, "recipe": recipe, "num_views": num_views},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=decode_tasks),
        num_cpus=1,
    )


def image_slots(shard_dir: str | Path, limit: int | None) -> dict[str, int]:
    """id -> position among the first ``limit`` images: the slot of a memory-bank method."""
    ids, _ = read_labels(Path(shard_dir))
    return {image_id: slot for slot, image_id in enumerate(ids[:limit])}


def dataset_rows(shard_dir: str | Path, limit: int | None) -> int:
    rows = load_manifest(Path(shard_dir)).rows
    return rows if limit is None else min(rows, limit)


def normalize(views: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) on the training device -> normalised float."""
    return (views.float().div_(255) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def channel_stats(pixels: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units of uint8 images (N, C, H, W)."""
    x = pixels.astype(np.float64) / 255
    return x.mean(axis=(0, 2, 3)).tolist(), (x.std(axis=(0, 2, 3)) + 1e-6).tolist()


@dataclass
class DecodedImages:
    """Images decoded in the driver: uint8 (N, C, S, S) pixels, labels (-1 where unknown)."""

    ids: list[str]
    pixels: np.ndarray
    labels: np.ndarray


def read_decoded(shard_dir: str | Path, spec: ImageSpec, limit: int | None = None) -> DecodedImages:
    """Decode the first ``limit`` images of a shard directory in this process, in shard order.

    For evaluation-sized data; training goes through the streaming ``training_dataset``.
    """
    ids: list[str] = []
    pixels: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for path in shard_files(Path(shard_dir)):
        table = pq.read_table(path, columns=["id", "image", "label"])
        if limit is not None:
            table = table.slice(0, limit - len(ids))
        row_ids = table.column("id").to_pylist()
        label_of = dict(zip(row_ids, table.column("label").fill_null(-1).to_pylist(), strict=True))
        kept, batch_pixels = decode_batch(
            np.asarray(row_ids, dtype=object),
            np.asarray(table.column("image").to_pylist(), dtype=object),
            spec,
        )
        ids.extend(kept)
        pixels.append(batch_pixels)
        labels.append(np.asarray([label_of[i] for i in kept], dtype=np.int64))
        if limit is not None and len(ids) >= limit:
            break
    return DecodedImages(ids, np.concatenate(pixels), np.concatenate(labels))
