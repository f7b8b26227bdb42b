"""Few-label fine-tuning: the pretrained backbone and a new linear head, trained end to end.

The semi-supervised protocol of SimCLR (Chen et al. 2020, arXiv:2002.05709, section 6) and
SimCLRv2 (Chen et al. 2020b, arXiv:2006.10029): draw a class-balanced 1% or 10% of the train
labels, fine-tune the whole network on them with only random resized crop and horizontal flip
(no colour distortion), and report accuracy on the full, unaugmented test split. Training
uses SGD with Nesterov momentum 0.9 and a cosine schedule; biases and normalisation
parameters get no weight decay, as in pretraining (ssl_models.optim.param_groups).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.augment import ViewRecipe, random_views
from pipeline.evaluate import topk_accuracy
from pipeline.ingest import normalize
from pipeline.linear_probe import new_head
from ssl_models.optim import param_groups, set_lr, warmup_cosine


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
    """Test top-1 / top-5 after fine-tuning a copy of ``backbone`` plus a new linear head.

    ``backbone`` maps normalised images to (N, ``feature_dim``) features
    (``SSLMethod.backbone``) and is left untouched. Train images are uint8 (N, C, H, H),
    augmented (random resized crop, scale 0.08-1, and horizontal flip) and then normalised
    with the per-channel ``mean`` and ``std`` of pipeline.ingest.channel_stats. Incomplete
    last batches are dropped (a batch of one would break batch norm). The number of classes
    is the largest label of either split plus one. The seed fixes the head, the batch order
    and the crops, so the result is deterministic on CPU; on CUDA it runs in bfloat16.
    """
    _check_split(train_pixels, train_labels, "train")
    _check_split(test_pixels, test_labels, "test")
    if test_pixels.shape[1:] != train_pixels.shape[1:]:
        raise ValueError(
            f"test_pixels are {test_pixels.shape[1:]} images, train_pixels {train_pixels.shape[1:]}"
        )
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(
            f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}"
        )
    device = torch.device(device)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    gen = torch.Generator().manual_seed(seed)
    encoder = copy.deepcopy(backbone).requires_grad_(True)
    model = nn.Sequential(encoder, new_head(feature_dim, num_classes, gen)).to(device)
    mean = torch.as_tensor(mean, dtype=torch.float32, device=device)
    std = torch.as_tensor(std, dtype=torch.float32, device=device)
    optimizer = torch.optim.SGD(
        param_groups(model, weight_decay), lr=lr, momentum=0.9, nesterov=True
    )
    recipe = ViewRecipe(
        size=train_pixels.shape[-1], crop_scale=(0.08, 1.0), jitter_prob=0.0, grayscale_prob=0.0
    )
    use_amp = device.type == "cuda"
    labels = torch.from_numpy(train_labels).long()
    steps_per_epoch = max(1, len(train_pixels) // batch_size)
    total = epochs * steps_per_epoch

    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(train_pixels), generator=gen)
        for step in range(steps_per_epoch):
            set_lr(optimizer, warmup_cosine(epoch * steps_per_epoch + step, total, 0, lr))
            rows = order[step * batch_size : (step + 1) * batch_size]
            images = torch.from_numpy(train_pixels[rows.numpy()]).to(device)
            views = normalize(random_views(images, recipe, gen), mean, std)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = F.cross_entropy(model(views).float(), labels[rows].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    model.eval()
    scores = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
        for start in range(0, len(test_pixels), batch_size):
            images = torch.from_numpy(test_pixels[start : start + batch_size]).to(device)
            scores.append(model(normalize(images, mean, std)).float().cpu())
    scores_all, targets = torch.cat(scores), torch.from_numpy(test_labels).long()
    return {
        "top1": topk_accuracy(scores_all, targets, 1),
        "top5": topk_accuracy(scores_all, targets, 5),
    }
