"""The pretext tasks' classification loss: cross-entropy over the task's classes (a rotation,
a tile permutation, a neighbour's position, a surrogate class, a future patch), and the top-1
accuracy logged alongside as ``pretext_accuracy``."""

import torch.nn.functional as F
from torch import Tensor


def classification_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(mean cross-entropy of ``logits`` (M, K) against class ``labels`` (M,), the detached
    fraction of rows whose largest logit is their label)."""
    labels = labels.long()
    loss = F.cross_entropy(logits, labels)
    accuracy = (logits.detach().argmax(1) == labels).float().mean()
    return loss, accuracy
