import pytest
import torch
from torch import nn

from ssl_models.heads import ProjectionHead, through_first_layer
from ssl_models.registry import build_method


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


def test_first_layer_start_is_the_backbone_then_linear_bn_relu_shared_not_copied():
    backbone = nn.Flatten()
    head = ProjectionHead(16, 32, 8, num_layers=3)
    start, width = through_first_layer(backbone, 16, head)
    assert width == 32
    assert [type(m) for m in start] == [nn.Flatten, nn.Linear, nn.BatchNorm1d, nn.ReLU]
    assert start[1] is head.layers[0] and start[0] is backbone
    x = torch.randn(6, 4, 4)
    head.eval()
    assert torch.equal(start(x), head.layers[:3](x.flatten(1)))


def test_a_head_without_hidden_layer_starts_at_the_backbone():
    backbone = nn.Flatten()
    start, width = through_first_layer(backbone, 16, ProjectionHead(16, 32, 8, num_layers=1))
    assert start is backbone and width == 16


@pytest.mark.parametrize(
    ("name", "options", "width"),
    [
        ("simclr", {"projection_hidden_dim": 48}, 48),
        ("moco_v2", {"projection_hidden_dim": 40}, 40),
        ("moco_v2", {"mlp_head": False}, None),  # MoCo v1's linear head: the backbone
        ("dino", {"head_hidden_dim": 24, "bottleneck_dim": 8, "out_dim": 16}, 24),  # GELU layer
        ("rotation", {}, None),  # no projection head
    ],
)
def test_each_method_fine_tunes_from_its_heads_first_layer(name, options, width):
    method = build_method(name, backbone="small_cnn", width=0.25, in_channels=1, **options)
    start, out = method.finetune_start()
    if width is None:
        assert start is method.backbone and out == method.feature_dim
    else:
        assert out == width and start[0] is method.backbone
        assert start.eval()(torch.rand(3, 1, 28, 28)).shape == (3, width)
