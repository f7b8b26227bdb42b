"""The one SGD classifier trainer of evaluation: the linear probe and fine-tuning both use it.

Both protocols train a new linear head (alone on frozen features, or on top of a copy of the
backbone on augmented images) the way SimCLR's evaluation does (Chen et al. 2020,
arXiv:2002.05709, appendix B.5): cross entropy, SGD with Nesterov momentum 0.9 and a cosine
learning-rate decay to 0 over every step, and score top-1 / top-5 on the test split. What
differs is handed in: the model, the parameter groups, where each epoch's batches come from
(in memory or streamed) and how a batch becomes the model's input (standardised features,
or augmented and normalised images).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models.optim import set_lr, warmup_cosine

Batches = Iterable[tuple[Tensor, Tensor]]  # (inputs, int labels) batches


@dataclass(frozen=True)
class SGDSettings:
    """How a classifier is trained: ``epochs`` passes in batches of ``batch_size``, SGD with
    Nesterov momentum 0.9 and cosine decay from ``lr``, ``weight_decay``; ``seed`` fixes the
    head, the batch order and any augmentation; ``device`` runs the training."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int
    device: torch.device | str

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(
                f"need epochs >= 1, batch_size >= 1, lr > 0; "
                f"got {self.epochs}, {self.batch_size}, {self.lr}"
            )

    def optimizer(self, params: Iterable[Any]) -> torch.optim.SGD:
        """SGD, Nesterov momentum 0.9, over ``params`` (tensors or parameter groups; a
        group's own ``weight_decay`` overrides the settings')."""
        return torch.optim.SGD(
            params, lr=self.lr, momentum=0.9, nesterov=True, weight_decay=self.weight_decay
        )


def new_head(in_dim: int, num_classes: int, gen: torch.Generator) -> nn.Linear:
    """A linear classifier with N(0, 0.01^2) weights and zero bias, as SimCLR's and DINO's
    evaluation heads; drawn from ``gen`` so a seed fixes it without touching global RNG."""
    head = nn.Linear(in_dim, num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.01)
        head.bias.zero_()
    return head


def train_classifier(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch_batches: Callable[[int], Batches],
    inputs: Callable[[Tensor], Tensor],
    settings: SGDSettings,
    steps_per_epoch: int,
    *,
    amp: bool = False,
) -> int:
    """``settings.epochs`` passes over ``epoch_batches(epoch)``, each batch turned into the
    model's input by ``inputs``; the learning rate decays along a cosine from ``settings.lr``
    over ``epochs * steps_per_epoch`` steps; cross entropy, in bfloat16 autocast with
    ``amp``. Returns the number of steps taken."""
    device = torch.device(settings.device)
    total = settings.epochs * steps_per_epoch
    step = 0
    for epoch in range(settings.epochs):
        for batch, labels in epoch_batches(epoch):
            set_lr(optimizer, warmup_cosine(min(step, total - 1), total, 0, settings.lr))
            x = inputs(batch)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(model(x).float(), labels.long().to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return step


class TopkHits:
    """Top-1 / top-5 hit counts accumulated over scored batches."""

    def __init__(self) -> None:
        self.rows = self.top1 = self.top5 = 0

    def add(self, scores: Tensor, labels: Tensor) -> None:
        """Count the hits of one batch's class scores (B, C) against its labels (B,)."""
        labels = labels.long().view(-1, 1)
        ranked = scores.topk(min(5, scores.shape[1]), dim=1).indices
        self.top1 += int((ranked[:, :1] == labels).any(1).sum())
        self.top5 += int((ranked == labels).any(1).sum())
        self.rows += len(labels)

    def accuracy(self, top5: bool = True) -> dict[str, float]:
        """{"top1", "top5"} (or only "top1") as fractions of the rows scored."""
        if not self.rows:
            raise ValueError("no rows were scored")
        result = {"top1": self.top1 / self.rows}
        if top5:
            result["top5"] = self.top5 / self.rows
        return result


@torch.no_grad()
def count_hits(
    model: nn.Module,
    batches: Batches,
    inputs: Callable[[Tensor], Tensor],
    device: torch.device | str = "cpu",
    *,
    amp: bool = False,
) -> TopkHits:
    """The model's hits over (inputs, labels) batches, each turned into the model's input by
    ``inputs``; in bfloat16 autocast with ``amp``."""
    hits = TopkHits()
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
        for batch, labels in batches:
            hits.add(model(inputs(batch)).float().cpu(), labels.cpu())
    return hits
