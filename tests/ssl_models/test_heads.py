import pytest
import torch
from torch import nn

from ssl_models.heads import ProjectionHead


def test_two_layer_projector_shape_and_layout():
    head = ProjectionHead(16, 32, 8)
    assert head(torch.randn(4, 16)).shape == (4, 8)
    kinds = [type(m) for m in head.layers]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]


def test_num_layers_and_last_bn():
    head = ProjectionHead(16, 32, 8, num_layers=3, last_bn=True)
    assert sum(isinstance(m, nn.Linear) for m in head.layers) == 3
    out = head.train()(torch.randn(10, 16))
    assert torch.allclose(out.mean(dim=0), torch.zeros(8), atol=1e-5)


def test_single_layer_is_linear():
    head = ProjectionHead(16, 32, 8, num_layers=1)
    assert len(head.layers) == 1 and isinstance(head.layers[0], nn.Linear)
    with pytest.raises(ValueError, match="num_layers"):
        ProjectionHead(16, 32, 8, num_layers=0)
