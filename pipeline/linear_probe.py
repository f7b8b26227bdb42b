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
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.evaluate import topk_accuracy
from ssl_models.optim import set_lr, warmup_cosine


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


def new_head(in_dim: int, num_classes: int, gen: torch.Generator) -> nn.Linear:
    """A linear classifier with N(0, 0.01^2) weights and zero bias, as SimCLR's and DINO's
    evaluation heads; drawn from ``gen`` so a seed fixes it without touching global RNG."""
    head = nn.Linear(in_dim, num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.01)
        head.bias.zero_()
    return head


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
    """Train a linear classifier on frozen features (N, D); return it on the CPU.

    Inputs are standardised per dimension with the train split's statistics (a constant
    dimension is only centred), and the returned layer has that folded into its weights, so
    it applies to raw features as they come from the backbone. SGD with Nesterov momentum
    0.9, cosine decay from ``lr`` to 0 over ``epochs`` reshuffled passes, cross entropy; the
    seed fixes the initial weights and batch order, so the result is deterministic on CPU.
    """
    check_labelled(train_features, train_labels, num_classes, "train")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(
            f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}"
        )
    x = train_features.detach().cpu().double()
    mean, std = x.mean(0), x.std(0, unbiased=False)
    std = torch.where(std > 1e-6 * std.max().clamp(min=1e-12), std, 1.0)
    x = ((x - mean) / std).float().to(device)
    y = train_labels.long().to(device)

    gen = torch.Generator().manual_seed(seed)
    head = new_head(x.shape[1], num_classes, gen).to(device)
    optimizer = torch.optim.SGD(
        head.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay
    )
    steps_per_epoch = -(-len(x) // batch_size)
    total = epochs * steps_per_epoch
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen).to(device)
        for step in range(steps_per_epoch):
            set_lr(optimizer, warmup_cosine(epoch * steps_per_epoch + step, total, 0, lr))
            batch = order[step * batch_size : (step + 1) * batch_size]
            loss = F.cross_entropy(head(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    # w . (f - mean) / std + b  ==  (w / std) . f + (b - (w / std) . mean)
    probe = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        weight = head.weight.detach().cpu().double() / std
        probe.weight.copy_(weight)
        probe.bias.copy_(head.bias.detach().cpu().double() - weight @ mean)
    return probe


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
