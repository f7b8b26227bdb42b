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
    """The rank of this process in the default group (0 when not distributed)."""
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


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0, in rank order, as constants (MoCo keys)."""
    if not _active():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def gather_uneven(x: Tensor) -> Tensor:
    """:func:`gather_no_grad` for ranks holding different numbers of rows (each rank's share
    of a dataset): rows are padded to the largest count for the gather, then trimmed."""
    if not _active():
        return x
    counts = gather_no_grad(torch.tensor([x.shape[0]], device=x.device)).tolist()
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = gather_no_grad(padded).chunk(len(counts))
    return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)])


@torch.no_grad()
def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum a statistic over ranks in place and return it (no gradient: a counter, a
    normaliser). Identity when not distributed."""
    if _active():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


@torch.no_grad()
def broadcast_from_rank0(*tensors: Tensor) -> None:
    """Overwrite each tensor, in place, with rank 0's (state every rank must agree on).
    Nothing to do when not distributed."""
    if _active():
        for tensor in tensors:
            dist.broadcast(tensor, src=0)


class _AllReduceSumWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum_with_grad(x: Tensor) -> Tensor:
    """Sum ``x`` over ranks, keeping gradients (a plain ``all_reduce`` has no backward).

    Every rank then holds the same global statistic and computes the same loss L; the
    backward sums the ranks' gradients, so each rank's local contribution receives R * dL/dx
    and DDP's averaging yields exactly the single-process gradient (the convention of the
    module docstring, with ``loss_r = L`` on every rank). Identity when not distributed.
    """
    if not _active():
        return x
    return _AllReduceSumWithGrad.apply(x)


@torch.no_grad()
def shuffle_across_ranks(x: Tensor) -> tuple[Tensor, Tensor]:
    """MoCo's shuffling BN: give this rank a random slice of the global batch.

    Returns (this rank's shuffled rows, the global permutation). Pass the permutation to
    :func:`unshuffle_across_ranks` to put the encoded rows back. Every rank draws the
    permutation from rank 0 so that the slices partition the global batch.
    """
    if not _active():
        perm = torch.randperm(x.shape[0], device=x.device)
        return x[perm], perm
    everything = gather_no_grad(x)
    perm = torch.randperm(everything.shape[0], device=x.device)
    dist.broadcast(perm, src=0)
    n = x.shape[0]
    return everything[perm[rank() * n : (rank() + 1) * n]], perm


@torch.no_grad()
def unshuffle_across_ranks(y: Tensor, perm: Tensor) -> Tensor:
    """Undo :func:`shuffle_across_ranks`: this rank's rows of the original order."""
    everything = gather_no_grad(y)
    restored = torch.empty_like(everything)
    restored[perm] = everything
    n = y.shape[0]
    return restored[rank() * n : (rank() + 1) * n]
