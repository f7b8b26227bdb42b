"""VICReg: loss values worked by hand, distributed equivalence, and the method."""

import math

import pytest
import torch
from torch import nn

from ssl_models.losses.vicreg import VICRegLoss, vicreg_loss
from ssl_models.method import Batch
from ssl_models.methods.vicreg import VICReg
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
N, IN_DIM, DIM = 8, 6, 5
WEIGHTS = (25.0, 25.0, 1.0)


def _loss(z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    return vicreg_loss(z_a, z_b, *WEIGHTS)[0]


def _reference_parts(z_a: list[list[float]], z_b: list[list[float]], eps: float):
    """Invariance, variance and covariance terms in plain Python (unbiased statistics)."""
    n, d = len(z_a), len(z_a[0])
    squares = [(z_a[k][j] - z_b[k][j]) ** 2 for k in range(n) for j in range(d)]
    invariance = sum(squares) / (n * d)

    def var_and_cov(z: list[list[float]]) -> tuple[float, float]:
        means = [sum(row[j] for row in z) / n for j in range(d)]
        c = [[row[j] - means[j] for j in range(d)] for row in z]
        cov = [[sum(r[i] * r[j] for r in c) / (n - 1) for j in range(d)] for i in range(d)]
        hinge = sum(max(0.0, 1 - math.sqrt(cov[j][j] + eps)) for j in range(d)) / d
        off = sum(cov[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d
        return hinge, off

    (var_a, cov_a), (var_b, cov_b) = var_and_cov(z_a), var_and_cov(z_b)
    return invariance, (var_a + var_b) / 2, cov_a + cov_b


def test_worked_example():
    z_a = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0], [3.0, 1.0]])
    z_b = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 2.0], [1.0, 2.0]])
    # Invariance: squared differences 1+0, 0+1, 1+4, 4+1 = 12 over 8 entries.
    invariance = 12 / 8
    # a: column 0 centred [-1.5, -.5, .5, 1.5] -> var 5/3, std > 1, no hinge; column 1
    # centred [-.5, .5, -.5, .5] -> var 1/3, hinge 1 - 1/sqrt3; cov_01 = (0.75 - 0.25 -
    # 0.25 + 0.75) / 3 = 1/3. b: column 0 constant -> std 0, hinge 1; column 1 centred
    # [-1, -1, 1, 1] -> var 4/3, no hinge; cov_01 = 0.
    variance = ((1 - 1 / math.sqrt(3)) / 2 + 1 / 2) / 2
    covariance = 2 * (1 / 3) ** 2 / 2 + 0.0
    loss, parts = vicreg_loss(z_a, z_b, *WEIGHTS, eps=0.0)
    assert parts["invariance"].item() == pytest.approx(invariance, abs=1e-6)
    assert parts["variance"].item() == pytest.approx(variance, abs=1e-6)
    assert parts["covariance"].item() == pytest.approx(covariance, abs=1e-6)
    expected = 25 * invariance + 25 * variance + covariance
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_matches_plain_python_reference():
    g = torch.Generator().manual_seed(3)
    z_a, z_b = 0.7 * torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    inv, var, cov = _reference_parts(z_a.tolist(), z_b.tolist(), eps=1e-4)
    loss, parts = vicreg_loss(z_a, z_b, 2.0, 3.0, 4.0)
    assert parts["invariance"].item() == pytest.approx(inv, abs=1e-6)
    assert parts["variance"].item() == pytest.approx(var, abs=1e-6)
    assert parts["covariance"].item() == pytest.approx(cov, abs=1e-6)
    assert loss.item() == pytest.approx(2 * inv + 3 * var + 4 * cov, abs=1e-5)
    assert all(not v.requires_grad for v in parts.values())


def test_identical_views_have_zero_invariance_term():
    z = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    _, parts = vicreg_loss(z, z.clone())
    assert parts["invariance"].item() == 0.0


def test_decorrelated_wide_embeddings_give_zero_loss():
    # Columns 1..7 of an 8x8 Hadamard matrix, scaled: mean 0, pairwise uncorrelated and
    # unbiased std 2 > 1, so identical views leave every term at zero.
    h = torch.tensor([[1.0]])
    for _ in range(3):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    z = 2 * h[:, 1:]
    loss, parts = vicreg_loss(z, z.clone())
    assert loss.item() == pytest.approx(0.0, abs=1e-8)
    # A collapsed branch is penalised by the variance hinge (std = sqrt(eps) per dim).
    _, parts = vicreg_loss(torch.zeros(8, 7), z)
    assert parts["variance"].item() == pytest.approx((1 - math.sqrt(1e-4)) / 2, abs=1e-6)


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="equal shape"):
        vicreg_loss(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="at least 2"):
        vicreg_loss(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match=">= 0"):
        VICRegLoss(sim_weight=-1.0)


# --- distributed equivalence -------------------------------------------------------------


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, nn.Linear]:
    z_a, z_b, x, linear = two_view_batch(N, DIM, IN_DIM)
    # Scaled so that some dimensions fall under the variance hinge and some do not.
    return z_a * torch.tensor([0.3, 0.6, 1.0, 1.5, 2.0]), z_b, x, linear


def _rank_fn(r: int) -> dict:
    z_a, z_b, x, linear = _data()
    rows = slice(r * N // WORLD, (r + 1) * N // WORLD)
    parts = vicreg_loss(z_a[rows], z_b[rows], *WEIGHTS)[1]
    return split_batch_grads(_loss, z_a, z_b, x, linear) | {"parts": parts}


def test_two_processes_match_single_process(tmp_path):
    results = run_on_ranks(_rank_fn, WORLD, tmp_path)
    assert [res["world_size"] for res in results] == [WORLD, WORLD]

    z_a, z_b, x, linear = _data()
    loss, grad_a, grad_b = single_process_grads(_loss, z_a, z_b, x, linear)
    parts = vicreg_loss(z_a, z_b, *WEIGHTS)[1]

    # Every rank computes the full global-batch loss and parts ...
    for res in results:
        assert torch.allclose(res["loss"], loss, atol=1e-5)
        for key, value in parts.items():
            assert torch.allclose(res["parts"][key], value, atol=1e-5)
    # ... receives WORLD x the single-process gradient for its own rows, and DDP's averaging
    # gives the single-process parameter gradients.
    assert_gradients_match(results, grad_a, grad_b, linear, atol=1e-5)


# --- the method --------------------------------------------------------------------------


def _tiny_model() -> VICReg:
    backbone, dim = tiny_backbone()
    return VICReg(backbone, dim, projection_hidden_dim=32, projection_dim=16)


def test_forward_returns_finite_loss_with_backbone_gradients():
    views = [torch.randn(16, 1, 16, 16), torch.randn(16, 1, 16, 16)]
    check_forward_backward(_tiny_model(), views, {"loss", "invariance", "variance", "covariance"})


def test_rejects_wrong_number_of_views():
    with pytest.raises(ValueError, match=r"takes \d+ views?"):
        _tiny_model()(Batch([torch.randn(4, 1, 16, 16)]))


def test_loss_decreases_on_fixed_batch():
    losses = train_losses(_tiny_model(), noisy_views(16, 16, seed=1), lr=0.01)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
