"""VICReg: loss values worked by hand, distributed equivalence, and the method."""

import math

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ssl_models import SSLMethod, build_backbone
from ssl_models.dist import world_size
from ssl_models.losses.vicreg import VICRegLoss, vicreg_loss
from ssl_models.method import MethodOutput
from ssl_models.methods.vicreg import VICReg
from tests.ssl_models.distributed import run_on_ranks

WORLD = 2
N, IN_DIM, DIM = 8, 6, 5
WEIGHTS = (25.0, 25.0, 1.0)


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
    g = torch.Generator().manual_seed(0)
    # Scaled so that some dimensions fall under the variance hinge and some do not.
    scale = torch.tensor([0.3, 0.6, 1.0, 1.5, 2.0])
    z_a, z_b = torch.randn(N, DIM, generator=g) * scale, torch.randn(N, DIM, generator=g)
    x = torch.randn(2 * N, IN_DIM, generator=g)  # view-a rows then view-b rows
    torch.manual_seed(0)
    return z_a, z_b, x, nn.Linear(IN_DIM, DIM)


def _loss_and_grads(z_a, z_b):
    z_a, z_b = z_a.clone().requires_grad_(), z_b.clone().requires_grad_()
    loss, parts = vicreg_loss(z_a, z_b, *WEIGHTS)
    loss.backward()
    return loss.detach(), parts, z_a.grad, z_b.grad


def _rank_fn(r: int) -> dict:
    z_a, z_b, x, linear = _data()
    n = N // WORLD
    rows = slice(r * n, (r + 1) * n)
    loss, parts, grad_a, grad_b = _loss_and_grads(z_a[rows], z_b[rows])
    ddp = DistributedDataParallel(linear)
    p_a, p_b = ddp(torch.cat([x[:N][rows], x[N:][rows]])).chunk(2)
    vicreg_loss(p_a, p_b, *WEIGHTS)[0].backward()
    return {
        "world_size": world_size(),
        "loss": loss,
        "parts": parts,
        "grad_a": grad_a,
        "grad_b": grad_b,
        "weight_grad": linear.weight.grad,
        "bias_grad": linear.bias.grad,
    }


def test_two_processes_match_single_process(tmp_path):
    results = run_on_ranks(_rank_fn, WORLD, tmp_path)
    assert [res["world_size"] for res in results] == [WORLD, WORLD]

    z_a, z_b, x, linear = _data()
    loss, parts, grad_a, grad_b = _loss_and_grads(z_a, z_b)
    p_a, p_b = linear(x).chunk(2)
    vicreg_loss(p_a, p_b, *WEIGHTS)[0].backward()

    # Every rank computes the full global-batch loss and parts ...
    for res in results:
        assert torch.allclose(res["loss"], loss, atol=1e-5)
        for key, value in parts.items():
            assert torch.allclose(res["parts"][key], value, atol=1e-5)
    # ... receives WORLD x the single-process gradient for its own rows ...
    for key, expected in (("grad_a", grad_a), ("grad_b", grad_b)):
        gathered = torch.cat([res[key] for res in results]) / WORLD
        assert torch.allclose(gathered, expected, atol=1e-5)
    # ... and DDP's averaging gives the single-process parameter gradients.
    for res in results:
        assert torch.allclose(res["weight_grad"], linear.weight.grad, atol=1e-5)
        assert torch.allclose(res["bias_grad"], linear.bias.grad, atol=1e-5)


# --- the method --------------------------------------------------------------------------


def _tiny_model() -> VICReg:
    torch.manual_seed(0)
    backbone, dim = build_backbone("small_cnn", width=0.25, in_channels=1)
    return VICReg(backbone, dim, projection_hidden_dim=32, projection_dim=16)


def test_forward_returns_finite_loss_with_backbone_gradients():
    model = _tiny_model()
    assert isinstance(model, SSLMethod)
    out = model([torch.randn(16, 1, 16, 16), torch.randn(16, 1, 16, 16)])
    assert isinstance(out, MethodOutput)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert set(out.logs) == {"loss", "invariance", "variance", "covariance"}
    assert all(not v.requires_grad for v in out.logs.values())
    out.loss.backward()
    grads = [p.grad for p in model.backbone.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_rejects_wrong_number_of_views():
    with pytest.raises(ValueError, match="2 views"):
        _tiny_model()([torch.randn(4, 1, 16, 16)])


def test_loss_decreases_on_fixed_batch():
    model = _tiny_model()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(16, 1, 16, 16, generator=g)
    views = [images + 0.3 * torch.randn(images.shape, generator=g) for _ in range(2)]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(30):
        out = model(views)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
