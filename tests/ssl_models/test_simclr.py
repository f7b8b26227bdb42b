import pytest
import torch

from ssl_models import SSLMethod, build_backbone
from ssl_models.method import MethodOutput
from ssl_models.methods import SimCLR


def _tiny_simclr() -> SimCLR:
    torch.manual_seed(0)
    backbone, dim = build_backbone("small_cnn", width=0.25, in_channels=1)
    return SimCLR(backbone, dim, projection_hidden_dim=32, projection_dim=16)


def test_forward_returns_finite_loss_with_backbone_gradients():
    model = _tiny_simclr()
    assert isinstance(model, SSLMethod)
    out = model([torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28)])
    assert isinstance(out, MethodOutput)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert set(out.logs) == {"loss", "pos_sim"}
    assert all(not v.requires_grad for v in out.logs.values())
    out.loss.backward()
    assert all(p.grad is not None for p in model.backbone.parameters())


def test_features_use_backbone_only():
    model = _tiny_simclr().eval()
    assert model.features(torch.randn(3, 1, 28, 28)).shape == (3, model.feature_dim)


def test_rejects_wrong_number_of_views():
    with pytest.raises(ValueError, match="2 views"):
        _tiny_simclr()([torch.randn(2, 1, 28, 28)])


def test_loss_decreases_on_fixed_batch():
    model = _tiny_simclr()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(16, 1, 28, 28, generator=g)
    views = [images + 0.3 * torch.randn(images.shape, generator=g) for _ in range(2)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(30):
        out = model(views)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
