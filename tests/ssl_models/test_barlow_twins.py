"""Barlow Twins: loss values worked by hand, distributed equivalence, and the method."""

import math
from functools import partial

import pytest
import torch
from torch import nn

from ssl_models.losses.barlow_twins import BarlowTwinsLoss, barlow_twins_loss
from ssl_models.method import Batch
from ssl_models.methods.barlow_twins import BarlowTwins
from tests.ssl_models.distributed import (
    assert_gradients_match,
    run_on_ranks,
    single_process_grads,
    split_batch_grads,
    two_view_batch,
)
from tests.ssl_models.helpers import (
    check_forward_backward,
    noisy_views,
    tiny_backbone,
    train_losses,
)

WORLD = 2
N, IN_DIM, DIM, LAMBDA = 8, 6, 5, 0.3
_loss = partial(barlow_twins_loss, lambda_offdiag=LAMBDA)


def _reference_loss(z_a: list[list[float]], z_b: list[list[float]], lam: float) -> float:
    """Eq. (1)-(2) in plain Python: biased per-column standardisation, C = a^T b / N."""
    n, d = len(z_a), len(z_a[0])

    def standardise(z: list[list[float]]) -> list[list[float]]:
        cols = []
        for j in range(d):
            col = [row[j] for row in z]
            mean = sum(col) / n
            std = math.sqrt(sum((v - mean) ** 2 for v in col) / n)
            cols.append([(v - mean) / std for v in col])
        return cols  # column-major

    a, b = standardise(z_a), standardise(z_b)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c_ij = sum(a[i][k] * b[j][k] for k in range(n)) / n
            loss += (1 - c_ij) ** 2 if i == j else lam * c_ij**2
    return loss


def test_worked_example():
    # Standardised columns: a0 = [1, -1, 1, -1], a1 = [1, 1, -1, -1],
    # b0 = [1, -1, 1, -1], b1 = [sqrt2, 0, 0, -sqrt2] (mean 0, biased var 1/2).
    # C00 = 1, C10 = 0, C01 = 2 sqrt2 / 4, C11 = 2 sqrt2 / 4, so
    # loss = (1 - sqrt2/2)^2 + lambda * (1/2) = 1.5 - sqrt2 + lambda / 2.
    z_a = torch.tensor([[1.0, 2.0], [-1.0, 2.0], [1.0, -2.0], [-1.0, -2.0]])
    z_b = torch.tensor([[3.0, 1.0], [1.0, 0.0], [3.0, 0.0], [1.0, -1.0]])
    expected = 1.5 - math.sqrt(2) + 0.5 / 2
    loss = barlow_twins_loss(z_a, z_b, 0.5, eps=0.0)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert barlow_twins_loss(z_a, z_b, 0.5).item() == pytest.approx(expected, rel=1e-4)


def test_matches_plain_python_reference_and_batchnorm_form():
    g = torch.Generator().manual_seed(3)
    z_a, z_b = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    expected = _reference_loss(z_a.tolist(), z_b.tolist(), LAMBDA)
    assert barlow_twins_loss(z_a, z_b, LAMBDA, eps=0.0).item() == pytest.approx(expected, abs=1e-5)

    # The reference implementation's form: BatchNorm1d(affine=False), C = bn(a)^T bn(b) / N.
    bn = nn.BatchNorm1d(3, affine=False)
    c = bn(z_a).T @ bn(z_b) / 4
    off = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    reference = (torch.diagonal(c) - 1).pow(2).sum() + LAMBDA * off
    assert torch.allclose(barlow_twins_loss(z_a, z_b, LAMBDA), reference, atol=1e-5)


def test_decorrelated_standardised_embeddings_give_zero_loss():
    # Columns 1..7 of an 8x8 Hadamard matrix: mean 0, variance 1, pairwise uncorrelated.
    h = torch.tensor([[1.0]])
    for _ in range(3):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    z = h[:, 1:]
    assert barlow_twins_loss(z, z.clone(), 1.0).item() == pytest.approx(0.0, abs=1e-8)
    # The per-dimension standardisation makes the loss invariant to shift and scale.
    assert barlow_twins_loss(3 * z + 5, z - 2, 1.0).item() == pytest.approx(0.0, abs=1e-8)


def test_identical_views_have_zero_invariance_term():
    z = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    # lambda = 0 leaves only sum_i (1 - C_ii)^2, and C_ii = 1 for identical views.
    assert barlow_twins_loss(z, z.clone(), 0.0, eps=0.0).item() == pytest.approx(0.0, abs=1e-10)
    assert barlow_twins_loss(z, z.clone(), 1.0).item() > 0.1  # off-diagonal term remains


def test_rejects_bad_shapes_and_lambda():
    with pytest.raises(ValueError, match="equal shape"):
        barlow_twins_loss(torch.randn(4, 3), torch.randn(4, 2), 0.1)
    with pytest.raises(ValueError, match="lambda_offdiag"):
        BarlowTwinsLoss(-1.0)


# --- distributed equivalence -------------------------------------------------------------


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, nn.Linear]:
    z_a, z_b, x, linear = two_view_batch(N, DIM, IN_DIM)
    return z_a, z_b + 1.0, x, linear


def _rank_fn(r: int) -> dict:
    return split_batch_grads(_loss, *_data())


def test_two_processes_match_single_process(tmp_path):
    results = run_on_ranks(_rank_fn, WORLD, tmp_path)
    assert [res["world_size"] for res in results] == [WORLD, WORLD]

    z_a, z_b, x, linear = _data()
    loss, grad_a, grad_b = single_process_grads(_loss, z_a, z_b, x, linear)

    # Every rank computes the full global-batch loss ...
    for res in results:
        assert torch.allclose(res["loss"], loss, atol=1e-5)
    # ... receives WORLD x the single-process gradient for its own rows, and DDP's averaging
    # gives the single-process parameter gradients.
    assert_gradients_match(results, grad_a, grad_b, linear, atol=1e-5)


# --- the method --------------------------------------------------------------------------


def _tiny_model() -> BarlowTwins:
    backbone, dim = tiny_backbone()
    return BarlowTwins(backbone, dim, projection_hidden_dim=32, projection_dim=16)


def test_forward_returns_finite_loss_with_backbone_gradients():
    views = [torch.randn(16, 1, 16, 16), torch.randn(16, 1, 16, 16)]
    check_forward_backward(_tiny_model(), views, {"loss", "pos_sim"})


def test_rejects_wrong_number_of_views():
    with pytest.raises(ValueError, match=r"takes \d+ views?"):
        _tiny_model()(Batch([torch.randn(4, 1, 16, 16)]))


def test_loss_decreases_on_fixed_batch():
    losses = train_losses(_tiny_model(), noisy_views(16, 16, seed=1), lr=0.05)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
