import pytest
import torch
from torch import nn

from ssl_models.method import Batch
from ssl_models.methods import SimCLR
from ssl_models.options import OptionError
from tests.ssl_models.helpers import (
    check_forward_backward,
    noisy_views,
    tiny_backbone,
    train_losses,
)


def _tiny_simclr() -> SimCLR:
    backbone, dim = tiny_backbone()
    return SimCLR(backbone, dim, projection_hidden_dim=32, projection_dim=16)


def test_forward_returns_finite_loss_with_backbone_gradients():
    views = [torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28)]
    check_forward_backward(_tiny_simclr(), views, {"loss", "pos_sim"})


def test_features_use_backbone_only():
    model = _tiny_simclr().eval()
    assert model.features(torch.randn(3, 1, 28, 28)).shape == (3, model.feature_dim)


def test_rejects_wrong_number_of_views():
    with pytest.raises(ValueError, match=r"takes \d+ views?"):
        _tiny_simclr()(Batch([torch.randn(2, 1, 28, 28)]))


def test_loss_decreases_on_fixed_batch():
    losses = train_losses(_tiny_simclr(), noisy_views(16, 28, seed=1), lr=0.1)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_simclr_v2s_projector_has_three_layers_and_a_normalised_output():
    backbone, dim = tiny_backbone()
    v1 = SimCLR(backbone, dim, projection_hidden_dim=32, projection_dim=16)
    v2 = SimCLR(backbone, dim, projection_hidden_dim=32, projection_dim=16, projection_layers=3)
    linears = [
        sum(isinstance(m, nn.Linear) for m in model.projector.modules()) for model in (v1, v2)
    ]
    assert linears == [2, 3]
    last = list(v2.projector.layers)[-1]
    assert isinstance(last, nn.BatchNorm1d) and not last.affine
    assert isinstance(list(v1.projector.layers)[-1], nn.Linear)
    with pytest.raises(OptionError, match="projection_layers must be one of \\[2, 3\\], got 4"):
        SimCLR.validate(SimCLR.option_defaults() | {"projection_layers": 4})
