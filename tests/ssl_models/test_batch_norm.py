"""Global batch norm equals one process's batch norm of the global batch (2 gloo ranks);
split batch norm normalises interleaved sub-batches apart; conversions keep the state."""

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.batch_norm import (
    GlobalBatchNorm,
    SplitBatchNorm,
    use_global_batch_norm,
    use_split_batch_norm,
)
from tests.ssl_models.distributed import run_on_ranks

N, C = 8, 3  # global batch, channels


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, C, 4, 4, generator=g) * 3 + 1, torch.randn(N, C, 4, 4, generator=g)


def _norm(cls: type) -> nn.Module:
    torch.manual_seed(0)
    norm = cls(C, momentum=0.3)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    return norm


def _global_bn_on_rank(rank: int) -> dict:
    x, coefficients = _batch()
    rows = slice(rank * N // 2, (rank + 1) * N // 2)
    norm = _norm(GlobalBatchNorm)
    mine = x[rows].clone().requires_grad_()
    y = norm(mine)
    (y * coefficients[rows]).sum().backward()  # this rank's share of one global loss
    return {
        "y": y.detach(),
        "x_grad": mine.grad,
        "weight_grad": norm.weight.grad,
        "running_mean": norm.running_mean,
        "running_var": norm.running_var,
    }


def test_two_ranks_match_one_process_over_the_global_batch(tmp_path):
    ranks = run_on_ranks(_global_bn_on_rank, world_size=2, tmp_path=tmp_path)
    x, coefficients = _batch()
    reference = _norm(nn.BatchNorm2d)
    whole = x.clone().requires_grad_()
    y = reference(whole)
    (y * coefficients).sum().backward()
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach())
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), whole.grad)
    # DDP averages parameter gradients: their sum over ranks is the one-process gradient.
    torch.testing.assert_close(sum(r["weight_grad"] for r in ranks), reference.weight.grad)
    for r in ranks:
        torch.testing.assert_close(r["running_mean"], reference.running_mean)
        torch.testing.assert_close(r["running_var"], reference.running_var)


def test_one_process_global_bn_is_plain_bn():
    x, _ = _batch()
    torch.testing.assert_close(_norm(GlobalBatchNorm)(x), _norm(nn.BatchNorm2d)(x))


def test_split_bn_normalises_each_interleaved_sub_batch_with_its_own_statistics():
    x, _ = _batch()
    norm = SplitBatchNorm(C, num_splits=4, momentum=0.3)
    y = norm(x)
    for k in range(4):
        expected = F.batch_norm(x[k::4], None, None, training=True, eps=norm.eps)
        torch.testing.assert_close(y[k::4], expected)
    # Running statistics: the average of the splits' updates.
    means = torch.stack([x[k::4].mean((0, 2, 3)) for k in range(4)])
    torch.testing.assert_close(norm.running_mean, 0.3 * means.mean(0))
    norm.eval()
    torch.testing.assert_close(
        norm(x), F.batch_norm(x, norm.running_mean, norm.running_var, eps=norm.eps)
    )


def test_conversions_keep_parameters_statistics_and_frozen_flags():
    model = nn.Sequential(nn.Conv2d(1, C, 3), nn.BatchNorm2d(C), nn.ReLU(), nn.BatchNorm1d(2))
    model[1].running_mean.fill_(0.5)
    model[1].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    use_global_batch_norm(model)
    assert isinstance(model[1], GlobalBatchNorm) and isinstance(model[3], GlobalBatchNorm)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not model[1].weight.requires_grad and model[1].bias.requires_grad
    split = use_split_batch_norm(nn.Sequential(nn.BatchNorm2d(C)), num_splits=2)
    assert isinstance(split[0], SplitBatchNorm) and split[0].num_splits == 2
