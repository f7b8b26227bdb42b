"""The Ray Data side: Parquet shards -> decoded images -> random uint8 views, streamed to Train.

The dataset is lazy, so every pass re-runs decode and augmentation and every view is drawn
afresh. Views stay uint8 until the training device, where ``normalize`` casts them.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import random
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data
import torch
from PIL import Image, ImageOps
from ray.actor import ActorHandle

from pipeline.data import locations
from pipeline.data.shards import (
    SHARD_SCHEMA,
    ShardManifest,
    load_manifest,
    open_parquet,
    read_labels,
    read_parquet,
    shard_files,
)
from ssl_models.transforms.pretext import PretextViews, split_columns
from ssl_models.transforms.views import ViewRecipe, random_views

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageSpec:
    """What every decoded image is made into: ``channels`` x ``size`` x ``size`` uint8."""

    size: int
    channels: int

    @classmethod
    def from_manifest(cls, manifest: ShardManifest, size: int | None) -> ImageSpec:
        """The spec of a manifest's images at side ``size``; None: the shards' own size, which
        must be one square size."""
        if size is None:
            if manifest.image_size is None or manifest.image_size[0] != manifest.image_size[1]:
                raise ValueError(
                    f"shards from {manifest.source!r} have no single square image size "
                    f"({manifest.image_size}); set data.image_size"
                )
            size = manifest.image_size[0]
        return cls(size=size, channels=manifest.channels)


def decode_image(data: bytes, spec: ImageSpec) -> np.ndarray:
    """Decode image bytes to (channels, size, size) uint8; resize + centre-crop if needed.

    Any mode is accepted (grey, RGBA, CMYK, palette, 16-bit); an image over Pillow's
    decompression-bomb limit raises instead of being decoded.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as opened:
            opened.draft("L" if spec.channels == 1 else "RGB", (spec.size, spec.size))
            opened.load()
            img: Image.Image = opened
            if img.mode.startswith("I;16"):  # 16-bit grey: keep the top 8 bits, not a clip
                img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8))
            img = img.convert("L" if spec.channels == 1 else "RGB")
    if img.size != (spec.size, spec.size):
        img = ImageOps.fit(img, (spec.size, spec.size), Image.Resampling.BICUBIC)
    array = np.asarray(img, dtype=np.uint8)
    return array[None] if spec.channels == 1 else array.transpose(2, 0, 1)


@dataclass
class DecodedBatch:
    """A decoded batch: kept rows' positions and pixels, and the rejected rows' reasons."""

    kept: list[int]
    pixels: np.ndarray
    rejects: dict[int, str]


def decode_batch(
    ids: Sequence[object] | np.ndarray, images: np.ndarray, spec: ImageSpec
) -> DecodedBatch:
    """Decode a batch; an undecodable row is rejected with its reason (logged), not raised."""
    kept, arrays, rejects = [], [], {}
    for position, data in enumerate(images):
        try:
            arrays.append(decode_image(data, spec))
            kept.append(position)
        except Exception as err:  # noqa: BLE001 - any decoder failure rejects just this row
            rejects[position] = f"{type(err).__name__}: {err}"
            log.warning("rejected image %s: %s", ids[position], rejects[position])
    shape = (0, spec.channels, spec.size, spec.size)
    return DecodedBatch(kept, np.stack(arrays) if arrays else np.zeros(shape, np.uint8), rejects)


def decoded_batch(
    batch: dict[str, np.ndarray], spec: ImageSpec, ledger: ActorHandle | None = None
) -> dict[str, np.ndarray]:
    """Ray Data batch function: {id, image bytes, label, epoch} -> {id, image uint8, label}.

    Rejected rows are logged and, with a ``ledger``, counted per epoch with id and reason.
    """
    ids = batch["id"]
    decoded = decode_batch(ids, batch["image"], spec)
    if ledger is not None:
        epochs = batch["epoch"]
        for epoch in np.unique(epochs).tolist():
            ledger.record.remote(
                epoch,
                int((epochs[decoded.kept] == epoch).sum()),
                [(str(ids[p]), r) for p, r in decoded.rejects.items() if epochs[p] == epoch],
            )
    return {
        "id": np.asarray(ids[decoded.kept], dtype=object),
        "image": decoded.pixels,
        "label": batch["label"][decoded.kept],
    }


@dataclass(frozen=True)
class ViewPlan:
    """What the data stage makes of each image: one augmented view per recipe (multi-crop's
    views differ in size), then, for a pretext task, the method's transform of those views
    into its inputs and targets (``MethodRequirements.pretext``)."""

    recipes: tuple[ViewRecipe, ...]
    pretext: PretextViews | None = None

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """uint8 images (N, C, H, W) -> {view_0, ..., target_<name>, ...}, N rows each."""
        return self.finish([random_views(images, recipe, gen) for recipe in self.recipes], gen)

    def finish(self, views: list[torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
        """The columns made of already augmented ``views``, one per recipe."""
        if self.pretext is None:
            return {f"view_{index}": view for index, view in enumerate(views)}
        return self.pretext(views, gen)


def augment_batch(
    batch: dict[str, np.ndarray],
    spec: ImageSpec,
    plan: ViewPlan,
    ledger: ActorHandle | None = None,
) -> dict[str, np.ndarray]:
    """Ray Data batch function: {id, image bytes, label, epoch} -> {id, label, view_0, ...,
    target_<name>, ...}: the ``plan``'s views (and pretext targets) of each image."""
    torch.set_num_threads(1)
    decoded = decoded_batch(batch, spec, ledger)
    # Fresh OS entropy per batch: views differ across workers and epochs by construction.
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
    columns = plan(torch.from_numpy(decoded.pop("image")), gen)
    return decoded | {name: column.numpy() for name, column in columns.items()}


def views_on_device(
    batch: dict[str, np.ndarray],
    plan: ViewPlan,
    device: torch.device,
    gen: torch.Generator | None = None,
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """The batch's uint8 views (in index order) and pretext targets (by name) on ``device``:
    shipped by the data stage, or, given ``gen`` (a CPU generator for the parameters), made
    there from the decoded images by the ``plan``."""
    if gen is None:
        columns = {
            name: torch.from_numpy(column).to(device, non_blocking=True)
            for name, column in batch.items()
            if name.startswith(("view_", "target_"))
        }
    else:
        columns = plan(torch.from_numpy(batch["image"]).to(device, non_blocking=True), gen)
    return split_columns(columns)


_ROWS_SCHEMA = pa.schema(
    [
        SHARD_SCHEMA.field("id"),
        SHARD_SCHEMA.field("image"),
        pa.field("label", pa.int64()),  # -1: unlabelled (the online probe skips the row)
        pa.field("epoch", pa.int32()),
    ]
)


def read_shard_rows(
    batch: pa.Table, skip_ids: list[str], ledger: ActorHandle | None = None
) -> pa.Table:
    """{path, epoch} -> the {id, image, label, epoch} rows of those files.

    Passes that training has already completed (per the ``ledger``) are not read.
    """
    epochs_done = 0
    if ledger is not None:
        reply: ray.ObjectRef[int] = ledger.completed.remote()  # actor methods are untyped
        epochs_done = ray.get(reply)
    tables = [_ROWS_SCHEMA.empty_table()]
    for path, epoch in zip(batch["path"].to_pylist(), batch["epoch"].to_pylist(), strict=True):
        if epoch <= epochs_done:
            continue
        parquet = open_parquet(path)
        labelled = "label" in parquet.schema_arrow.names  # optional in user-made shards
        table = parquet.read(columns=["id", "image", "label"] if labelled else ["id", "image"])
        labels = (
            pc.fill_null(table["label"], -1).cast(pa.int64())
            if labelled
            else pa.array(np.full(len(table), -1, np.int64))
        )
        epochs = pa.array([epoch] * len(table), pa.int32())
        table = table.select(["id", "image"]).append_column("label", labels)
        tables.append(table.append_column("epoch", epochs).cast(_ROWS_SCHEMA))
    table = pa.concat_tables(tables)
    if skip_ids:
        table = table.filter(pc.invert(pc.is_in(table["id"], value_set=pa.array(skip_ids))))
    return table


@dataclass(frozen=True)
class Passes:
    """The (file, epoch) passes a stream makes, in order: epochs ``first_epoch`` + 1 to
    ``first_epoch`` + ``epochs``, each over ``files`` in its own order, seeded by ``seed`` and
    the epoch (``shuffle=False``: the given order). Computed where they are read, one epoch at
    a time, so what a dataset is built from does not grow with the number of epochs."""

    files: tuple[str, ...]
    epochs: int = 1
    first_epoch: int = 0
    seed: int = 0
    shuffle: bool = True

    def order(self, epoch: int) -> list[str]:
        """The files in epoch ``epoch``'s order."""
        order = list(self.files)
        if self.shuffle:
            random.Random(self.seed * 100_003 + epoch).shuffle(order)
        return order

    def __iter__(self) -> Iterator[tuple[str, int]]:
        for epoch in range(self.first_epoch + 1, self.first_epoch + self.epochs + 1):
            for path in self.order(epoch):
                yield path, epoch

    def lane(self, index: int, lanes: int) -> Iterator[tuple[str, int]]:
        """Every ``lanes``-th pass from the ``index``-th: lane ``index``'s share, in order."""
        return itertools.islice(self, index, None, lanes)


def lane_batches(
    batch: dict[str, np.ndarray],
    passes: Passes,
    lanes: int,
    skip_ids: list[str],
    batch_size: int,
    spec: ImageSpec,
    plan: ViewPlan | None,
    ledger: ActorHandle | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data batch function: {lane} -> that lane's passes (``Passes.lane``), file by file:
    each file's rows are read (unless the ``ledger`` says training completed that pass),
    then decoded and, given a ``plan``, made into views, ``batch_size`` rows at a time. A
    generator: each batch leaves as soon as it is made, and a lane runs for the whole
    stream, reading its next file only as its output is taken."""
    for lane in batch["lane"].tolist():
        for path, epoch in passes.lane(int(lane), lanes):
            files = pa.table({"path": [path], "epoch": pa.array([epoch], pa.int32())})
            rows = read_shard_rows(files, skip_ids, ledger)
            for start in range(0, len(rows), batch_size):
                chunk = rows.slice(start, batch_size)
                columns = {
                    name: chunk[name].to_numpy(zero_copy_only=False) for name in chunk.column_names
                }
                if plan is None:
                    yield decoded_batch(columns, spec, ledger)
                else:
                    yield augment_batch(columns, spec, plan, ledger)


def synthetic_batch(ids: list, spec: ImageSpec, plan: ViewPlan) -> dict[str, np.ndarray]:
    """A fixed batch of random uint8 views, one per recipe at its size, through the plan's
    pretext transform if any: the data path's speed ceiling, for benchmarks."""
    gen = torch.Generator().manual_seed(0)
    views = [
        torch.randint(0, 256, (len(ids), spec.channels, r.size, r.size), generator=gen).byte()
        for r in plan.recipes
    ]
    columns = plan.finish(views, gen)
    return {"id": np.asarray(ids, dtype=object)} | {k: v.numpy() for k, v in columns.items()}


def _files_for_limit(shard_dir: str, limit: int | None) -> tuple[list[str], list[str]]:
    """The shard files holding the first ``limit`` rows, and the ids past the limit in the
    last of them. Ray's own ``limit`` keeps whichever rows arrive first, which would change
    the training subset from epoch to epoch."""
    files, rows = [], 0
    for path in shard_files(shard_dir):
        if limit is not None and rows >= limit:
            break
        files.append(path)
        rows += open_parquet(path).metadata.num_rows
    if limit is None or rows <= limit:
        return files, []
    last_ids = read_parquet(files[-1], ["id"]).column("id").to_pylist()
    return files, last_ids[len(last_ids) - (rows - limit) :]


def training_dataset(
    shard_dir: str | Path,
    spec: ImageSpec,
    plan: ViewPlan | None,
    *,
    epochs: int = 1,
    first_epoch: int = 0,
    seed: int = 0,
    limit: int | None = None,
    decode_tasks: int = 2,
    batch_size: int = 256,
    ledger: ActorHandle | None = None,
) -> ray.data.Dataset:
    """Lazy Ray dataset of augmented views for ``epochs`` passes (with ids and labels).

    All passes are one stream, each over the shard files in its own seeded order
    (``Passes``), so the next epoch's decoding overlaps the end of the current one instead
    of restarting the execution (and its worker processes) at every epoch. The stream is
    built from ``decode_tasks`` lanes, whatever the number of epochs (see
    ``_views_of_passes``). Passes are numbered from ``first_epoch`` + 1 (a resumed run
    continues the numbering and the orders); a ``ledger`` (pipeline.data.ledger) counts each
    one's delivered and rejected rows. Each row carries the ``plan``'s views (and pretext
    targets); with ``plan=None`` the stage only decodes and the views are made on the
    training device (``views_on_device``).
    """
    files, beyond_limit = _files_for_limit(str(shard_dir), limit)
    passes = Passes(tuple(files), epochs=epochs, first_epoch=first_epoch, seed=seed)
    return _views_of_passes(
        passes, beyond_limit, spec, plan, ledger, batch_size=batch_size, tasks=decode_tasks
    )


def shard_rows_dataset(
    shard_dir: str | os.PathLike[str], columns: Sequence[str]
) -> ray.data.Dataset:
    """Lazy Ray dataset of ``columns`` of every row of the shards in ``shard_dir`` (a local
    directory or an object-storage prefix), read by Ray Data's Parquet reader in tasks."""
    files = shard_files(shard_dir)
    filesystem = locations.resolve(files[0])[0] if files else None
    paths = [locations.resolve(location)[1] for location in files]
    return ray.data.read_parquet(paths, filesystem=filesystem).select_columns(list(columns))


def decoded_dataset(
    shard_dir: str | Path,
    spec: ImageSpec,
    *,
    part: tuple[int, int] = (0, 1),
    limit: int | None = None,
    decode_tasks: int = 2,
    batch_size: int = 256,
) -> ray.data.Dataset:
    """Lazy Ray dataset of the decoded {id, image uint8, label} rows of the first ``limit``
    images, without augmentation: the evaluation view of the training set. ``part=(i, n)``
    keeps the i-th of n interleaved slices of the shard files, so n workers can each
    decode a share without any row lost to equal-size splitting. Undecodable rows are
    logged and left out; callers count what arrived."""
    index, parts = part
    if not 0 <= index < parts:
        raise ValueError(f"part must be (i, n) with 0 <= i < n, got {part}")
    files, beyond_limit = _files_for_limit(str(shard_dir), limit)
    passes = Passes(tuple(files[index::parts]), shuffle=False)
    return _views_of_passes(
        passes, beyond_limit, spec, None, None, batch_size=batch_size, tasks=decode_tasks
    )


# Batches the stream may hold ahead of training (a block is about one batch). Bounded, so the
# decoding runs at training's pace from the first epoch: unbounded, a short run decodes its
# whole stream during epoch 1 and a long one spends its first epochs filling the object store.
READ_AHEAD_BLOCKS = 32


def _block_bytes(spec: ImageSpec, plan: ViewPlan | None, batch_size: int) -> int:
    """About one output batch's size: the stream's target block size, so each batch made
    leaves its task at once (Ray's default of 128 MiB would hold a lane's output back)."""
    sizes = [spec.size] if plan is None else [recipe.size for recipe in plan.recipes]
    return max(1 << 18, batch_size * spec.channels * sum(size * size for size in sizes))


def _views_of_passes(
    passes: Passes,
    skip_ids: list[str],
    spec: ImageSpec,
    plan: ViewPlan | None,
    ledger: ActorHandle | None,
    *,
    batch_size: int,
    tasks: int,
) -> ray.data.Dataset:
    """Read the ``passes``' rows, then decode them and, given a ``plan``, make the views, in
    ``tasks`` parallel lanes.

    The dataset is built from one input row per lane, whatever the number of passes: each
    lane's task works through its share of the passes in order (``lane_batches``) and yields
    its batches as it goes. One input row per (file, pass) instead made Ray Data's executor
    hold every pass as a queued input and run a read stage ahead of the decoding; with
    hundreds of passes queued, finished reads waited behind the backpressure and the
    scheduling loop polled them without blocking (about half a core on 2 cores, a third of
    the training speed; pipeline.cluster.IdleWhileBackpressured rests the loop meanwhile).

    The stream holds at most ``READ_AHEAD_BLOCKS`` blocks ahead of training (an object
    store limit in its execution options, which the trainer keeps), so decoding runs at
    training's pace from the first epoch, whatever the number of epochs.
    """
    lanes = max(1, min(tasks, len(passes.files) * passes.epochs))
    ds: ray.data.Dataset = ray.data.from_items(
        [{"lane": lane} for lane in range(lanes)], override_num_blocks=lanes
    )
    # Ray types map_batches' fn as taking the batch alone; fn_kwargs supplies the rest.
    ds = ds.map_batches(
        lane_batches,  # type: ignore[arg-type]
        fn_kwargs={
            "passes": passes,
            "lanes": lanes,
            "skip_ids": skip_ids,
            "batch_size": batch_size,
            "spec": spec,
            "plan": plan,
            "ledger": ledger,
        },
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=lanes),
        num_cpus=1,
    )
    block_bytes = _block_bytes(spec, plan, batch_size)
    ds.context.target_max_block_size = block_bytes
    limits = ds.context.execution_options.resource_limits
    ds.context.execution_options.resource_limits = limits.copy(
        object_store_memory=READ_AHEAD_BLOCKS * block_bytes
    )
    return ds


def image_slots(shard_dir: str | Path, limit: int | None) -> dict[str, int]:
    """Each id's position among the first ``limit`` images: its slot in a memory-bank method."""
    ids, _ = read_labels(shard_dir)
    return {image_id: slot for slot, image_id in enumerate(ids[:limit])}


def dataset_rows(shard_dir: str | Path, limit: int | None) -> int:
    """How many images training uses: the shards' rows, at most ``limit``."""
    rows = load_manifest(shard_dir).rows
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
    for path in shard_files(shard_dir):
        table = read_parquet(path, ["id", "image", "label"])
        if limit is not None:
            table = table.slice(0, limit - len(ids))
        row_ids = table.column("id").to_pylist()
        row_labels = table.column("label").fill_null(-1).to_numpy()
        images = np.asarray(table.column("image").to_pylist(), dtype=object)
        decoded = decode_batch(row_ids, images, spec)
        ids.extend(row_ids[p] for p in decoded.kept)
        pixels.append(decoded.pixels)
        labels.append(row_labels[decoded.kept].astype(np.int64))
        if limit is not None and len(ids) >= limit:
            break
    return DecodedImages(ids, np.concatenate(pixels), np.concatenate(labels))


def load_labelled(
    shard_dir: str | Path, spec: ImageSpec, limit: int | None = None
) -> DecodedImages:
    """``read_decoded``, for uses that need every image labelled (kNN): ValueError names
    the shard directory when any of the first ``limit`` images has no label."""
    images = read_decoded(shard_dir, spec, limit)
    unlabelled = int((images.labels < 0).sum())
    if unlabelled:
        raise ValueError(f"{shard_dir}: {unlabelled} images have no label; kNN needs labels")
    return images
