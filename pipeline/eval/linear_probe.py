"""Linear evaluation: a softmax classifier trained on frozen features.

The standard self-supervised protocol (Zhang et al. 2016, arXiv:1603.08511; SimCLR, Chen et al.
2020, arXiv:2002.05709, appendix B.5): the backbone's (pre-projector) features of every image
are computed once, and only a linear layer is trained on them, with cross entropy, SGD with
Nesterov momentum 0.9 and a cosine learning-rate schedule. Precomputed features rule out
augmentation, which also makes the probe cheap enough to run after every pretraining run.

Features are standardised with the train split's per-dimension mean and std first. Feature
scales differ by orders of magnitude between backbones (and between ReLU and L2-normalised
outputs), so without it each backbone needs its own learning rate; SimCLR and solo-learn get
the same effect from a BatchNorm without affine parameters in front of the classifier.

At scale the features never sit in one process: ``linear_probe_accuracy_streamed`` takes
them from Parquet written once by the embedding job (pipeline.eval.features), the statistics
from one streamed pass, and streams shuffled batches each epoch through the same SGD loop
(``fit_linear_head``) as the in-memory ``train_linear_probe``; that loop is
pipeline.eval.classifier's trainer, which fine-tuning uses too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.eval.classifier import Batches, SGDSettings, count_hits, new_head, train_classifier
from pipeline.eval.features import FeatureSplit
from ssl_models.knn import topk_accuracy


def check_labelled(features: Tensor, labels: Tensor, num_classes: int | None, split: str) -> None:
    """Raise ValueError unless ``features`` (N, D) and integer ``labels`` (N,) in
    [0, num_classes) form a non-empty split (any label >= 0 when ``num_classes`` is None);
    ``split`` names it in the message."""
    if features.ndim != 2:
        raise ValueError(f"{split}_features must be (N, D), got shape {tuple(features.shape)}")
    if labels.ndim != 1 or len(labels) != len(features):
        raise ValueError(
            f"{split}_labels must be one label per row of {split}_features "
            f"({len(features)}), got shape {tuple(labels.shape)}"
        )
    if len(labels) == 0:
        raise ValueError(f"{split}_features is empty")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{split}_labels must be integers, got {labels.dtype}")
    upper = num_classes if num_classes is not None else int(labels.max()) + 1
    if labels.min() < 0 or labels.max() >= upper:
        raise ValueError(
            f"{split}_labels must lie in [0, {upper}), got {int(labels.min())}..{int(labels.max())}"
        )


class Moments:
    """Per-dimension mean and std of features that arrive batch by batch (float64 sums of
    values and squares, shifted by the first batch's mean for accuracy)."""

    def __init__(self) -> None:
        self.count = 0
        self.shift: Tensor | None = None
        # Scalar zeros, broadcast to (D,) by the first batch's sums.
        self.total = torch.zeros((), dtype=torch.float64)
        self.squares = torch.zeros((), dtype=torch.float64)

    def add(self, features: Tensor) -> None:
        """Accumulate one batch of features (B, D)."""
        x = features.detach().cpu().double()
        if not len(x):
            return
        if self.shift is None:
            self.shift = x.mean(0)
        x = x - self.shift
        self.total = self.total + x.sum(0)
        self.squares = self.squares + (x * x).sum(0)
        self.count += len(x)

    def mean_std(self) -> tuple[Tensor, Tensor]:
        """Mean and population std (float64); a constant dimension's std is 1 (only centred)."""
        if self.count == 0 or self.shift is None:
            raise ValueError("no features to standardise")
        centred = self.total / self.count
        std = (self.squares / self.count - centred**2).clamp(min=0).sqrt()
        std = torch.where(std > 1e-6 * std.max().clamp(min=1e-12), std, 1.0)
        return self.shift + centred, std


def fit_linear_head(
    epoch_batches: Callable[[torch.Generator], Batches],
    rows: int,
    mean: Tensor,
    std: Tensor,
    num_classes: int,
    settings: SGDSettings,
) -> nn.Linear:
    """The probe's SGD loop (pipeline.eval.classifier): ``epochs`` passes over
    ``epoch_batches(gen)`` (raw features (B, D) and labels; the source shuffles with
    ``gen``), standardised with ``mean`` / ``std`` (float64, D), cosine decay over
    ``epochs * ceil(rows / batch_size)`` steps, cross entropy. Returns the layer on the CPU
    with the standardisation folded in, so it applies to raw features."""
    gen = torch.Generator().manual_seed(settings.seed)
    device = torch.device(settings.device)
    head = new_head(len(mean), num_classes, gen).to(device)

    def standardised(features: Tensor) -> Tensor:
        return ((features.double() - mean) / std).float().to(device)

    steps_per_epoch = -(-rows // settings.batch_size)
    optimizer = settings.optimizer(head.parameters())
    train_classifier(
        head, optimizer, lambda _: epoch_batches(gen), standardised, settings, steps_per_epoch
    )
    return _fold_standardisation(head, mean, std)


def _fold_standardisation(head: nn.Linear, mean: Tensor, std: Tensor) -> nn.Linear:
    """A CPU layer on raw features equal to ``head`` on standardised ones:
    w . (f - mean) / std + b  ==  (w / std) . f + (b - (w / std) . mean)."""
    probe = nn.Linear(head.in_features, head.out_features)
    with torch.no_grad():
        weight = head.weight.detach().cpu().double() / std
        probe.weight.copy_(weight)
        probe.bias.copy_(head.bias.detach().cpu().double() - weight @ mean)
    return probe


def train_linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    num_classes: int,
    *,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 0.1,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> nn.Linear:
    """Train a linear classifier on frozen features (N, D) held in memory; return it on the CPU.

    Inputs are standardised per dimension with the train split's statistics (a constant
    dimension is only centred), and the returned layer has that folded into its weights, so
    it applies to raw features as they come from the backbone. SGD with Nesterov momentum
    0.9, cosine decay from ``lr`` to 0 over ``epochs`` reshuffled passes, cross entropy; the
    seed fixes the initial weights and batch order, so the result is deterministic on CPU.
    ``train_linear_probe_streamed`` runs the same loop on features streamed from Parquet.
    """
    check_labelled(train_features, train_labels, num_classes, "train")
    settings = SGDSettings(epochs, batch_size, lr, weight_decay, seed, device)
    moments = Moments()
    moments.add(train_features)
    x = train_features.detach().cpu()
    y = train_labels.detach().cpu()

    def epoch_batches(gen: torch.Generator) -> Batches:
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            rows = order[start : start + batch_size]
            yield x[rows], y[rows]

    return fit_linear_head(epoch_batches, len(x), *moments.mean_std(), num_classes, settings)


def train_linear_probe_streamed(
    train: FeatureSplit,
    num_classes: int,
    *,
    shuffle_buffer: int = 65536,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 0.1,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> nn.Linear:
    """``train_linear_probe`` on features written as Parquet (``pipeline.eval.features``): the
    standardisation statistics come from one streamed pass, then each epoch streams the
    row groups in a seeded random order through a ``shuffle_buffer``-row shuffle buffer, so
    the driver holds at most about a buffer and a row group of features."""
    if train.rows == 0:
        raise ValueError("train_features is empty")
    settings = SGDSettings(epochs, batch_size, lr, weight_decay, seed, device)
    moments = Moments()
    for features, labels in train.batches(batch_size):
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"train_labels must lie in [0, {num_classes}), "
                f"got {int(labels.min())}..{int(labels.max())}"
            )
        moments.add(features)

    def epoch_batches(gen: torch.Generator) -> Batches:
        return train.batches(batch_size, gen=gen, shuffle_buffer=shuffle_buffer)

    return fit_linear_head(epoch_batches, train.rows, *moments.mean_std(), num_classes, settings)


def _cpu_features(features: Tensor) -> Tensor:
    return features.float().cpu()


def linear_probe_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    **settings: Any,
) -> dict[str, float]:
    """Top-1 / top-5 test accuracy of a probe trained on the train split, and its train top-1.

    ``settings`` go to :func:`train_linear_probe`; the number of classes is the largest label
    of either split plus one. Train top-1 far above test top-1 means the probe memorised.
    """
    check_labelled(train_features, train_labels, None, "train")
    check_labelled(test_features, test_labels, None, "test")
    if test_features.shape[1] != train_features.shape[1]:
        raise ValueError(
            f"test_features have {test_features.shape[1]} dimensions, "
            f"train_features {train_features.shape[1]}"
        )
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    probe = train_linear_probe(train_features, train_labels, num_classes, **settings)
    with torch.no_grad():
        test_scores = probe(test_features.float().cpu())
        train_scores = probe(train_features.float().cpu())
    return {
        "top1": topk_accuracy(test_scores, test_labels.cpu(), 1),
        "top5": topk_accuracy(test_scores, test_labels.cpu(), 5),
        "train_top1": topk_accuracy(train_scores, train_labels.cpu(), 1),
    }


def linear_probe_accuracy_streamed(
    train: FeatureSplit, test: FeatureSplit, num_classes: int, **settings: Any
) -> dict[str, float]:
    """``linear_probe_accuracy`` on features written as Parquet: trained with
    :func:`train_linear_probe_streamed` (``settings``), scored batch by batch."""
    if test.rows == 0:
        raise ValueError("test_features is empty")
    if test.dim != train.dim:
        raise ValueError(f"test_features have {test.dim} dimensions, train_features {train.dim}")
    probe = train_linear_probe_streamed(train, num_classes, **settings)
    batch_size = settings.get("batch_size", 256)
    test_hits = count_hits(probe, test.batches(batch_size), _cpu_features)
    train_hits = count_hits(probe, train.batches(batch_size), _cpu_features)
    return {
        **test_hits.accuracy(),
        "train_top1": train_hits.accuracy(top5=False)["top1"],
    }
