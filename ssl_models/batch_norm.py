"""Batch-norm variants for training across processes, and the conversions that install them.

- :class:`GlobalBatchNorm`: statistics over the global batch (all ranks), as SimCLR, BYOL,
  MoCo v3, Barlow Twins and VICReg train ("global BN", SyncBN). torch's ``SyncBatchNorm``
  runs only on accelerators; this one all-reduces each rank's per-channel sum, sum of
  squares and count (``ssl_models.dist.all_reduce_sum_with_grad``), so it works on any
  device and backend, gloo on CPU included, and its backward carries the other ranks'
  share of the statistics' gradient exactly as a single process over the global batch would
  (with DDP's averaging, see ``ssl_models.dist``). One process: ordinary batch norm.
- :class:`SplitBatchNorm`: "ghost" BN over ``num_splits`` interleaved sub-batches, as the
  official MoCo CIFAR demo uses on one GPU, where MoCo's shuffled BN has no other rank to
  shuffle keys to: shuffled keys then land in other sub-batches than their queries, so BN
  statistics cannot leak which key matches which query. Running statistics are the
  sub-batches' average. Only in a single process; with several ranks it is ordinary BN
  (the ranks' own batches are the splits, and MoCo shuffles keys across them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ssl_models.dist import all_reduce_sum_with_grad, world_size


class _AnyShapeBatchNorm(_BatchNorm):
    """Batch norm over (N, C, ...) inputs of any rank >= 2 (one class for 1d, 2d and 3d)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {input.dim()}D")


class GlobalBatchNorm(_AnyShapeBatchNorm):
    """Batch norm whose training statistics cover every rank's batch (any input rank >= 2)."""

    def forward(self, input: Tensor) -> Tensor:
        """Normalise with the global batch's mean and (biased) variance in training, with
        the running statistics in eval mode."""
        if not self.training or world_size() == 1:
            return super().forward(input)
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        x = input.float()
        count = torch.tensor([x.numel() / channels], device=x.device)
        totals = all_reduce_sum_with_grad(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
        n = totals[-1]
        mean = totals[:channels] / n
        var = (totals[channels : 2 * channels] / n - mean * mean).clamp_min(0)
        self._update_running_stats(mean.detach(), var.detach(), n.detach())
        shape = [1, channels] + [1] * (input.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, n: Tensor) -> None:
        """The running averages, as torch's batch norm keeps them (unbiased variance)."""
        if not self.track_running_stats or self.running_mean is None:
            return
        assert self.running_var is not None and self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        unbiased = var * n / (n - 1).clamp_min(1)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


class SplitBatchNorm(_AnyShapeBatchNorm):
    """Batch norm over ``num_splits`` interleaved sub-batches in single-process training
    (sample i in split i mod num_splits); the batch must divide into them."""

    def __init__(self, num_features: int, num_splits: int, **kwargs: object) -> None:
        super().__init__(num_features, **kwargs)  # type: ignore[arg-type]
        self.num_splits = num_splits

    def forward(self, input: Tensor) -> Tensor:
        """Each split normalised with its own statistics; the running statistics move by
        the splits' average."""
        splits = self.num_splits
        if not self.training or splits == 1 or world_size() > 1:
            return super().forward(input)
        n, channels = input.shape[:2]
        if n % splits:
            raise ValueError(f"a batch of {n} does not split into {splits} BN sub-batches")
        assert self.running_mean is not None and self.running_var is not None
        running_mean = self.running_mean.repeat(splits)
        running_var = self.running_var.repeat(splits)
        # (N, C, ...) -> (N / s, s * C, ...): channel block k holds samples k, k + s, ...
        out = F.batch_norm(
            input.reshape(n // splits, splits * channels, *input.shape[2:]),
            running_mean,
            running_var,
            self.weight.repeat(splits) if self.affine else None,
            self.bias.repeat(splits) if self.affine else None,
            True,
            self.momentum if self.momentum is not None else 0.1,
            self.eps,
        )
        with torch.no_grad():
            self.running_mean.copy_(running_mean.view(splits, channels).mean(0))
            self.running_var.copy_(running_var.view(splits, channels).mean(0))
        return out.view_as(input)


def _replace_batch_norms(
    module: nn.Module, make: Callable[..., _BatchNorm], **extra: int
) -> nn.Module:
    """Every plain batch norm in ``module`` (1d, 2d, 3d) replaced by ``make`` with the same
    settings, parameters and running statistics; returns ``module`` (changed in place)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d):
            replacement = make(
                child.num_features,
                eps=child.eps,
                momentum=child.momentum,
                affine=child.affine,
                track_running_stats=child.track_running_stats,
                **extra,
            )
            replacement.load_state_dict(child.state_dict())
            replacement.train(child.training)
            for new, old in zip(replacement.parameters(), child.parameters(), strict=True):
                new.requires_grad_(old.requires_grad)
            setattr(module, name, replacement.to(next(child.buffers(), torch.empty(0)).device))
        else:
            _replace_batch_norms(child, make, **extra)
    return module


def use_global_batch_norm(module: nn.Module) -> nn.Module:
    """Turn every batch norm of ``module`` into :class:`GlobalBatchNorm` (in place)."""
    return _replace_batch_norms(module, GlobalBatchNorm)


def use_split_batch_norm(module: nn.Module, num_splits: int) -> nn.Module:
    """Turn every batch norm of ``module`` into :class:`SplitBatchNorm` (in place)."""
    return _replace_batch_norms(module, SplitBatchNorm, num_splits=num_splits)
