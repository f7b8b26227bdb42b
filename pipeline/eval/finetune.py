"""Few-label fine-tuning: the pretrained backbone and a new linear head, trained end to end.

The semi-supervised protocol of SimCLR (Chen et al. 2020, arXiv:2002.05709, section 6) and
SimCLRv2 (Chen et al. 2020b, arXiv:2006.10029): draw a class-balanced 1% or 10% of the train
labels, fine-tune the whole network on them with only random resized crop and horizontal flip
(no colour distortion), and report accuracy on the full, unaugmented test split. Training
uses SGD with Nesterov momentum 0.9 and a cosine schedule; biases and normalisation
parameters get no weight decay, as in pretraining (ssl_models.optim.param_groups).

At scale (``finetune_accuracy_streamed``) the subset is picked by id from the split's labels
(ids and labels only, O(N) small values), its images stream through Ray Data each epoch
and the test split is scored batch by batch; one loop serves both forms, and it is the
linear probe's trainer (pipeline.eval.classifier) with the backbone in the model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
import torch
from torch import Tensor, nn

from pipeline.data.ingest import ImageSpec, decoded_batch, normalize, shard_rows_dataset
from pipeline.eval.classifier import Batches, SGDSettings, count_hits, new_head, train_classifier
from ssl_models.optim import param_groups
from ssl_models.transforms.views import ViewRecipe, random_views


def balanced_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted row indices of a class-balanced random subset of a labelled split.

    Each class keeps ``round(fraction * its count)`` rows (Python's round, half to even), at
    least one, drawn without replacement; a seed gives the same rows on every call.
    """
    labels = np.asarray(labels)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty vector, got shape {labels.shape}")
    if (labels < 0).any():
        raise ValueError(f"labels has {int((labels < 0).sum())} unlabelled (negative) entries")
    rng = np.random.default_rng(seed)
    picked = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        picked.append(rng.choice(rows, max(1, round(fraction * len(rows))), replace=False))
    return np.sort(np.concatenate(picked))


def _check_split(pixels: np.ndarray, labels: np.ndarray, split: str) -> None:
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[2] != pixels.shape[3]:
        raise ValueError(
            f"{split}_pixels must be square uint8 (N, C, H, H) images, "
            f"got {pixels.dtype} {pixels.shape}"
        )
    if len(pixels) == 0:
        raise ValueError(f"{split}_pixels is empty")
    if labels.shape != (len(pixels),) or (labels < 0).any():
        raise ValueError(
            f"{split}_labels must be one label >= 0 per image ({len(pixels)}), "
            f"got shape {labels.shape}, minimum {labels.min() if labels.size else None}"
        )


def _check_splits(
    train_pixels: np.ndarray,
    train_labels: np.ndarray,
    test_pixels: np.ndarray,
    test_labels: np.ndarray,
) -> None:
    _check_split(train_pixels, train_labels, "train")
    _check_split(test_pixels, test_labels, "test")
    if test_pixels.shape[1:] != train_pixels.shape[1:]:
        raise ValueError(
            f"test_pixels are {test_pixels.shape[1:]} images, train_pixels {train_pixels.shape[1:]}"
        )


def _finetune(
    backbone: nn.Module,
    feature_dim: int,
    num_classes: int,
    image_size: int,
    epoch_batches: Callable[[int, torch.Generator], Batches],
    steps_per_epoch: int,
    scored: dict[str, Callable[[], Batches]],
    mean: Tensor | Sequence[float],
    std: Tensor | Sequence[float],
    settings: SGDSettings,
) -> dict[str, dict[str, float]]:
    """The fine-tuning loop (pipeline.eval.classifier's trainer): ``epochs`` passes of
    ``epoch_batches(epoch, gen)`` (uint8 images (B, C, S, S) and labels), each image cropped
    and flipped with ``gen``, then each of the ``scored`` splits' batches scored unaugmented
    ({split: accuracy}); every source may be in memory or streamed. Biases and
    normalisation parameters get no weight decay."""
    device = torch.device(settings.device)
    gen = torch.Generator().manual_seed(settings.seed)
    encoder = copy.deepcopy(backbone).requires_grad_(True)
    model = nn.Sequential(encoder, new_head(feature_dim, num_classes, gen)).to(device)
    mean = torch.as_tensor(mean, dtype=torch.float32, device=device)
    std = torch.as_tensor(std, dtype=torch.float32, device=device)
    optimizer = settings.optimizer(param_groups(model, settings.weight_decay))
    recipe = ViewRecipe(
        size=image_size, crop_scale=(0.08, 1.0), jitter_prob=0.0, grayscale_prob=0.0
    )
    amp = device.type == "cuda"

    def augmented(images: Tensor) -> Tensor:
        return normalize(random_views(images.to(device), recipe, gen), mean, std)

    def unaugmented(images: Tensor) -> Tensor:
        return normalize(images.to(device), mean, std)

    model.train()
    steps = train_classifier(
        model, optimizer, lambda epoch: epoch_batches(epoch, gen), augmented, settings,
        steps_per_epoch, amp=amp,
    )  # fmt: skip
    if steps == 0:
        raise ValueError("fine-tuning got no complete training batch")
    model.eval()
    return {
        split: count_hits(model, batches(), unaugmented, device, amp=amp).accuracy()
        for split, batches in scored.items()
    }


def finetune_accuracy(
    backbone: nn.Module,
    feature_dim: int,
    train_pixels: np.ndarray,
    train_labels: np.ndarray,
    test_pixels: np.ndarray,
    test_labels: np.ndarray,
    mean: Tensor | Sequence[float],
    std: Tensor | Sequence[float],
    *,
    epochs: int = 30,
    batch_size: int = 256,
    lr: float = 0.05,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Test top-1 / top-5 after fine-tuning a copy of ``backbone`` plus a new linear head,
    on images held in memory (``finetune_accuracy_streamed`` streams them through Ray Data).

    ``backbone`` maps normalised images to (N, ``feature_dim``) features
    (``SSLMethod.backbone``) and is left untouched. Train images are uint8 (N, C, H, H),
    augmented (random resized crop, scale 0.08-1, and horizontal flip) and then normalised
    with the per-channel ``mean`` and ``std`` of pipeline.data.ingest.channel_stats. Incomplete
    last batches are dropped (a batch of one would break batch norm). The number of classes
    is the largest label of either split plus one. The seed fixes the head, the batch order
    and the crops, so the result is deterministic on CPU; on CUDA it runs in bfloat16.
    """
    _check_splits(train_pixels, train_labels, test_pixels, test_labels)
    settings = SGDSettings(epochs, batch_size, lr, weight_decay, seed, device)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    labels = torch.from_numpy(train_labels).long()
    steps_per_epoch = max(1, len(train_pixels) // batch_size)

    def epoch_batches(epoch: int, gen: torch.Generator) -> Batches:
        order = torch.randperm(len(train_pixels), generator=gen)
        for step in range(steps_per_epoch):
            rows = order[step * batch_size : (step + 1) * batch_size]
            yield torch.from_numpy(train_pixels[rows.numpy()]), labels[rows]

    def test_batches() -> Batches:
        for start in range(0, len(test_pixels), batch_size):
            rows = slice(start, start + batch_size)
            yield torch.from_numpy(test_pixels[rows]), torch.from_numpy(test_labels[rows])

    return _finetune(
        backbone, feature_dim, num_classes, train_pixels.shape[-1], epoch_batches,
        steps_per_epoch, {"test": test_batches}, mean, std, settings,
    )["test"]  # fmt: skip


def _keep_ids(batch: pa.Table, ids: pa.Array) -> pa.Table:
    """Ray Data batch function: the rows whose id is in ``ids`` (before any decoding)."""
    return batch.filter(pc.is_in(batch["id"], value_set=ids))


def subset_rows(shard_dir: str, ids: Sequence[str]) -> ray.data.Dataset:
    """The encoded {id, image, label} rows of ``shard_dir`` whose id is in ``ids``, read once
    and held by Ray's object store (spilled to disk when large), not by the driver: each
    epoch decodes them afresh, so only the subset's encoded bytes are kept."""
    return (
        shard_rows_dataset(shard_dir, ["id", "image", "label"])
        # Ray types map_batches' fn as taking the batch alone; fn_kwargs supplies the rest.
        .map_batches(
            _keep_ids,  # type: ignore[arg-type]
            fn_kwargs={"ids": pa.array(list(ids), pa.string())},
            batch_format="pyarrow",
        )
        .materialize()
    )


def _image_batches(
    ds: ray.data.Dataset, batch_size: int, *, drop_last: bool = False, **shuffle: Any
) -> Batches:
    for batch in ds.iter_batches(
        batch_size=batch_size, batch_format="numpy", drop_last=drop_last, **shuffle
    ):
        yield torch.from_numpy(batch["image"]), torch.from_numpy(batch["label"].astype(np.int64))


def decoded_rows(rows: ray.data.Dataset, spec: ImageSpec) -> ray.data.Dataset:
    """Encoded {id, image, label} rows as decoded {image, label} (lazy: decoded per pass)."""
    # Ray types map_batches' fn as taking the batch alone; fn_kwargs supplies the rest.
    return rows.map_batches(
        decoded_batch,  # type: ignore[arg-type]
        fn_kwargs={"spec": spec},
        batch_size=256,
        batch_format="numpy",
    ).select_columns(["image", "label"])


def finetune_accuracy_streamed(
    backbone: nn.Module,
    feature_dim: int,
    train_rows: ray.data.Dataset,
    train_count: int,
    test: ray.data.Dataset,
    spec: ImageSpec,
    num_classes: int,
    mean: Tensor | Sequence[float],
    std: Tensor | Sequence[float],
    *,
    epochs: int = 30,
    batch_size: int = 256,
    lr: float = 0.05,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    shuffle_buffer: int = 4096,
    validation: ray.data.Dataset | None = None,
) -> dict[str, float]:
    """``finetune_accuracy`` with the images streamed through Ray Data: ``train_rows`` are
    the label subset's encoded rows (``subset_rows``, ``train_count`` of them), decoded
    afresh each epoch and shuffled with a seeded local buffer; ``test`` is a decoded
    dataset ({id, image, label}, e.g. ``ingest.decoded_dataset``) scored batch by batch.
    Same recipe: crop + flip drawn in the driver's loop, incomplete batches dropped (a
    subset smaller than a batch is one batch). With a ``validation`` dataset (decoded, e.g.
    ``decoded_rows``), its top-1 is returned too, as ``val_top1``, to choose settings by."""
    if train_count < 1:
        raise ValueError("train_pixels is empty")
    settings = SGDSettings(epochs, batch_size, lr, weight_decay, seed, device)
    batch_size = min(batch_size, train_count)
    decoded = decoded_rows(train_rows, spec)

    def epoch_batches(epoch: int, gen: torch.Generator) -> Batches:
        return _image_batches(
            decoded.randomize_block_order(seed=seed * 1000 + epoch),
            batch_size,
            drop_last=True,
            local_shuffle_buffer_size=max(shuffle_buffer, batch_size),
            local_shuffle_seed=seed * 1000 + epoch,
        )

    def scored(split: ray.data.Dataset) -> Callable[[], Batches]:
        return lambda: _image_batches(split.select_columns(["image", "label"]), batch_size)

    splits = {"test": test} | ({"val": validation} if validation is not None else {})
    accuracy = _finetune(
        backbone, feature_dim, num_classes, spec.size, epoch_batches,
        max(1, train_count // batch_size), {name: scored(split) for name, split in splits.items()},
        mean, std, settings,
    )  # fmt: skip
    if validation is not None:
        return accuracy["test"] | {"val_top1": accuracy["val"]["top1"]}
    return accuracy["test"]
