"""Fixed-size stores of past embeddings: MoCo's FIFO queue and InstDisc's memory bank.

Both are ``nn.Module`` buffers, so they travel with ``state_dict()`` through checkpoints.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FeatureQueue(nn.Module):
    """First-in-first-out queue of ``size`` L2-normalised keys (MoCo, He et al. 2020).

    ``size`` must be a multiple of the global batch so that a push never wraps mid-batch;
    the first push checks it and says so.
    """

    features: Tensor  # buffer (size, dim): the queued keys
    pointer: Tensor  # buffer (): the row the next push starts at

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("features", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, keys: Tensor) -> None:
        """Replace the oldest ``len(keys)`` entries with ``keys`` (already gathered)."""
        size, batch = self.features.shape[0], keys.shape[0]
        if size % batch:
            raise ValueError(
                f"queue size {size} must be a multiple of the global batch {batch}; "
                "change method.queue_size or train.batch_size"
            )
        start = int(self.pointer)
        self.features[start : start + batch] = keys.to(self.features.dtype)
        self.pointer.fill_((start + batch) % size)


class MemoryBank(nn.Module):
    """One L2-normalised feature per dataset image, updated proximally (Wu et al. 2018).

    ``v_i <- normalise(m * v_i + (1 - m) * f_i)`` for the images in the batch.
    """

    features: Tensor  # buffer (size, dim): one feature per dataset image

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("features", F.normalize(torch.randn(size, dim), dim=1))

    @torch.no_grad()
    def update(self, indices: Tensor, features: Tensor, momentum: float) -> None:
        """Move the bank entries at ``indices`` towards ``features`` (already gathered)
        by ``momentum``, then renormalise them."""
        mixed = momentum * self.features[indices] + (1 - momentum) * features.to(
            self.features.dtype
        )
        self.features[indices] = F.normalize(mixed, dim=1)
