import pytest
import torch
import torchvision
from torch import nn

from ssl_models import BACKBONES, build_backbone


@pytest.mark.parametrize("name", sorted(BACKBONES))
@pytest.mark.parametrize("width", [0.25, 1.0])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_output_shape(name, width, shape):
    model, dim = build_backbone(name, width=width, in_channels=shape[0])
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, dim)


def test_resnet_stage_widths_scale():
    assert build_backbone("resnet18", width=0.25)[1] == 128
    assert build_backbone("resnet18", width=1.0)[1] == 512
    assert build_backbone("resnet50", width=0.25)[1] == 512  # 128 x Bottleneck expansion 4
    model, _ = build_backbone("resnet18", width=0.25)
    stage_widths = [getattr(model, f"layer{i}")[0].conv1.out_channels for i in range(1, 5)]
    assert stage_widths == [16, 32, 64, 128]


def test_resnet18_matches_torchvision_architecture():
    reference = torchvision.models.resnet18(weights=None)
    reference.fc = nn.Identity()
    model, _ = build_backbone("resnet18", small_images=False)
    # Same module names and shapes: torchvision's weights load strictly, outputs agree.
    model.load_state_dict(reference.state_dict())
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(model.eval()(x), reference.eval()(x), atol=1e-5)

    # The small-image stem only changes conv1 from 7x7 to 3x3.
    small, _ = build_backbone("resnet18", small_images=True)
    count = sum(p.numel() for p in small.parameters())
    assert count == sum(p.numel() for p in reference.parameters()) - (7 * 7 - 3 * 3) * 3 * 64


def test_in_channels_sets_stem_input():
    model, _ = build_backbone("resnet18", width=0.25, in_channels=1)
    assert model.conv1.in_channels == 1


def test_unknown_name_lists_available():
    with pytest.raises(ValueError, match="resnet18.*small_cnn"):
        build_backbone("vgg11")
