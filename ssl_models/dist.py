"""Distributed helpers that reduce to no-ops in a single process.

Gradient convention of :func:`gather_with_grad` (what makes distributed contrastive losses
match the single-process loss exactly). With R ranks, rank r computes ``loss_r``: the mean
over its own anchors of a loss that also reads every rank's embeddings through the gather.
The single-process loss over the global batch is ``L = (1/R) * sum_r loss_r``. Rank s's
embeddings influence every ``loss_r``, so the backward pass hands rank s the gradient

    sum_r d loss_r / d z_s  =  R * dL / dz_s,

i.e. the full gradient all-reduced with SUM, then sliced to rank s's rows. DDP then averages
parameter gradients over ranks (divides by R), which gives exactly ``dL / d theta``. Equally:
a rank's gradient w.r.t. its own input rows, divided by R, is the single-process gradient.
"""

import torch
import torch.distributed as dist
from torch import Tensor


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if _active() else 1


def rank() -> int:
    """This process's rank in the default group (0 when not distributed)."""
    return dist.get_rank() if _active() else 0


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # Clone: all_reduce works in place and autograd may reuse the incoming buffer.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        n = grad.shape[0] // dist.get_world_size()
        start = dist.get_rank() * n
        return grad[start : start + n]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0, in rank order, keeping gradients.

    Every rank must pass the same shape (use ``drop_last`` batches). The backward pass
    follows the convention in the module docstring. Identity when not distributed.
    """
    if not _active():
        return x
    return _GatherWithGrad.apply(x)
