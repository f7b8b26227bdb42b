import math

import pytest
import torch

from ssl_models import SSLMethod
from ssl_models.losses.byol import byol_loss
from ssl_models.losses.cosine import negative_cosine_similarity
from ssl_models.method import Batch
from ssl_models.methods.byol import BYOL
from ssl_models.momentum import cosine_momentum
from tests.ssl_models.helpers import noisy_views, tiny_backbone, train_losses


def _tiny_byol(base_momentum: float = 0.9) -> BYOL:
    backbone, dim = tiny_backbone()
    return BYOL(
        backbone, dim, projection_hidden_dim=32, projection_dim=16, base_momentum=base_momentum
    )


def _views(seed: int = 1) -> list[torch.Tensor]:
    return noisy_views(8, 16, seed)


def _online(model: BYOL) -> list[torch.Tensor]:
    return [*model.backbone.parameters(), *model.projector.parameters()]


def _target(model: BYOL) -> list[torch.Tensor]:
    return [*model.target_backbone.parameters(), *model.target_projector.parameters()]


def test_losses_match_hand_computed_values():
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 0.0]])
    z = torch.tensor([[0.0, 1.0], [2.0, 2.0], [-1.0, 0.0]])
    # cos = 0 (orthogonal), 1 (same direction), -1 (opposite): mean -cos = 0.
    assert negative_cosine_similarity(p, z).item() == pytest.approx(0.0, abs=1e-6)
    # 2 - 2 cos: 2, 0, 4 -> mean 2.
    assert byol_loss(p, z).item() == pytest.approx(2.0, abs=1e-6)
    assert byol_loss(p[1:2], z[1:2]).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(p[2:], z[2:]).item() == pytest.approx(4.0, abs=1e-6)
    # Equals the squared distance of the normalised vectors (paper eq. 2).
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    direct = (a / a.norm(dim=1, keepdim=True) - b / b.norm(dim=1, keepdim=True)).pow(2).sum(1)
    assert byol_loss(a, b).item() == pytest.approx(direct.mean().item(), abs=1e-5)


def test_target_starts_as_exact_frozen_copy_and_gets_no_gradient():
    model = _tiny_byol()
    assert isinstance(model, SSLMethod)
    assert len(_online(model)) == len(_target(model)) > 0
    for s, t in zip(_online(model), _target(model), strict=True):
        assert torch.equal(s, t) and s.data_ptr() != t.data_ptr()
        assert s.requires_grad and not t.requires_grad
    out = model(Batch(_views()))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert set(out.logs) == {"loss", "momentum"}
    assert all(not v.requires_grad for v in out.logs.values())
    out.loss.backward()
    assert all(t.grad is None for t in _target(model))
    assert all(p.grad is not None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())
    # The optimiser never sees the target.
    grouped = {id(p) for g in model.parameter_groups(1e-4) for p in g["params"]}
    assert grouped.isdisjoint(id(t) for t in _target(model))


def test_ema_update_after_optimizer_step():
    base = 0.9
    model = _tiny_byol(base)
    opt = torch.optim.SGD(model.parameter_groups(0.0), lr=0.5)
    model(Batch(_views())).loss.backward()
    t_old = [t.detach().clone() for t in _target(model)]
    opt.step()
    # The step changed the online network but not (yet) the target.
    assert any(not torch.equal(s, t) for s, t in zip(_online(model), t_old, strict=True))
    assert all(torch.equal(t, o) for t, o in zip(_target(model), t_old, strict=True))
    model.after_optimizer_step(step=0, total_steps=10)
    m = cosine_momentum(0, 10, base)
    assert m == pytest.approx(base)
    for t, old, s in zip(_target(model), t_old, _online(model), strict=True):
        expected = old.clone().mul_(m).add_(s.detach(), alpha=1 - m)
        assert torch.equal(t, expected)
    # Buffers (BN running statistics) are copied from the online network.
    for t, s in zip(model.target_backbone.buffers(), model.backbone.buffers(), strict=True):
        assert torch.equal(t, s)
    assert model.current_momentum.item() == pytest.approx(m)


def test_momentum_schedule_rises_to_one():
    model = _tiny_byol(0.99)
    assert model.current_momentum.item() == pytest.approx(0.99)
    seen = []
    for step in range(0, 21):
        model.after_optimizer_step(step, 20)
        seen.append(model.current_momentum.item())
    assert seen[0] == pytest.approx(0.99)
    assert all(b >= a for a, b in zip(seen, seen[1:], strict=False))
    assert seen[-1] == 1.0
    assert cosine_momentum(10, 20, 0.99) == pytest.approx(0.995)
    # With m = 1 the target no longer moves.
    before = [t.clone() for t in _target(model)]
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)
    model.after_optimizer_step(20, 20)
    assert all(torch.equal(a, b) for a, b in zip(before, _target(model), strict=True))


def test_state_dict_round_trip_restores_target():
    model = _tiny_byol()
    opt = torch.optim.SGD(model.parameter_groups(0.0), lr=0.5)
    model(Batch(_views())).loss.backward()
    opt.step()
    model.after_optimizer_step(3, 10)
    state = model.state_dict()
    assert any(k.startswith("target_backbone.") for k in state)
    assert any(k.startswith("target_projector.") for k in state)
    fresh = _tiny_byol()
    with torch.no_grad():
        for t in _target(fresh):
            t.add_(torch.randn_like(t))
    fresh.load_state_dict(state)
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert fresh.current_momentum.item() == pytest.approx(cosine_momentum(3, 10, 0.9))


def test_rejects_wrong_number_of_views():
    with pytest.raises(ValueError, match=r"takes \d+ views?"):
        _tiny_byol()(Batch([torch.randn(2, 1, 16, 16)]))


def test_features_use_online_backbone():
    model = _tiny_byol().eval()
    images = torch.randn(3, 1, 16, 16)
    assert model.features(images).shape == (3, model.feature_dim)
    assert torch.equal(model.features(images), model.backbone(images))


def test_loss_decreases_on_fixed_batch():
    model = _tiny_byol(0.9)
    losses = train_losses(model, _views(seed=2), params=model.parameter_groups(0.0))
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
