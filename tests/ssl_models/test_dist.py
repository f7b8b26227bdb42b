"""Two gloo processes on halves of a batch must reproduce single-process NT-Xent exactly."""

from functools import partial

import torch
from torch import nn

from ssl_models.dist import gather_uneven, gather_with_grad, rank, world_size
from ssl_models.losses import nt_xent_loss
from tests.ssl_models.distributed import (
    assert_gradients_match,
    run_on_ranks,
    single_process_grads,
    split_batch_grads,
    two_view_batch,
)

WORLD = 2
N, IN_DIM, DIM, T = 8, 6, 5, 0.5
_loss = partial(nt_xent_loss, temperature=T)


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, nn.Linear]:
    return two_view_batch(N, DIM, IN_DIM)


def _rank_fn(r: int) -> dict:
    # This rank's rows: the loss, its gradients, and the same loss through a DDP-wrapped layer.
    # Also an uneven gather: rank r holds r + 2 rows (one spawn serves both checks).
    uneven = torch.arange(2 * (r + 2)).view(r + 2, 2) + 100 * r
    return split_batch_grads(_loss, *_data()) | {"uneven": gather_uneven(uneven)}


def test_two_processes_match_single_process(tmp_path):
    results = run_on_ranks(_rank_fn, WORLD, tmp_path)
    assert [(res["rank"], res["world_size"]) for res in results] == [(0, WORLD), (1, WORLD)]

    z_a, z_b, x, linear = _data()
    loss, grad_a, grad_b = single_process_grads(_loss, z_a, z_b, x, linear)

    # The single-process loss is the mean of the per-rank losses.
    mean_loss = torch.stack([res["loss"] for res in results]).mean()
    assert torch.allclose(mean_loss, loss, atol=1e-6)
    # Each rank receives the sum over ranks of its rows' gradient, i.e. WORLD x the
    # single-process gradient (see ssl_models.dist); DDP's averaging undoes the factor.
    assert_gradients_match(results, grad_a, grad_b, linear, atol=1e-6)
    # Rank 0's 2 rows, then rank 1's 3, on every rank.
    expected = torch.tensor([[0, 1], [2, 3], [100, 101], [102, 103], [104, 105]])
    assert all(torch.equal(res["uneven"], expected) for res in results)


def test_gather_is_identity_outside_distributed():
    assert (world_size(), rank()) == (1, 0)
    x = torch.randn(3, 4, requires_grad=True)
    y = gather_with_grad(x)
    assert torch.equal(y, x)
    weights = torch.randn(3, 4)
    (y * weights).sum().backward()
    assert torch.equal(x.grad, weights)
