import pytest
import torch
import torchvision
from torch import nn

from ssl_models import BACKBONES, build_backbone
from ssl_models.optim import param_groups


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


def _vit(name="vit_tiny", width=0.25, in_channels=3, small_images=True):
    torch.manual_seed(0)
    return build_backbone(name, width=width, in_channels=in_channels, small_images=small_images)


@pytest.mark.parametrize("name", ["vit_tiny", "vit_small"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [(28, 28), (32, 32), (12, 12), (32, 12)])
def test_vit_output_shapes_on_small_images_and_local_crops(name, channels, size):
    model, dim = _vit(name, in_channels=channels)
    assert model.patch_size == 4 and model.grid_size == 8  # 32 px reference grid
    x = torch.randn(2, channels, *size)
    assert model(x).shape == (2, dim)
    tokens = model.patch_tokens(x)
    assert tokens.shape == (2, (size[0] // 4) * (size[1] // 4), dim)
    assert model.encode(tokens).shape == (2, 1 + tokens.shape[1], dim)


def test_vit_on_224_px_images_uses_16_px_patches():
    model, dim = _vit(small_images=False)
    assert (model.patch_size, model.grid_size, dim) == (16, 14, 48)
    x = torch.randn(1, 3, 224, 224)
    assert model.patch_tokens(x).shape == (1, 196, 48)
    assert model(x).shape == (1, 48)


@pytest.mark.parametrize(
    ("name", "width", "dim", "heads"),
    [
        ("vit_tiny", 1.0, 192, 3),
        ("vit_tiny", 0.5, 96, 3),
        ("vit_tiny", 0.3, 57, 3),  # 192 x 0.3 / 3 heads = 19.2 -> 19 per head
        ("vit_tiny", 0.001, 3, 3),  # at least one dim per head
        ("vit_small", 1.0, 384, 6),
        ("vit_small", 0.25, 96, 6),
    ],
)
def test_vit_width_scales_embedding_dim_at_fixed_heads(name, width, dim, heads):
    model, out_dim = build_backbone(name, width=width)
    assert out_dim == model.out_dim == dim
    assert len(model.blocks) == 12
    attention = model.blocks[0].self_attention
    assert (attention.num_heads, attention.head_dim) == (heads, dim // heads)
    assert model.blocks[0].mlp[0].out_features == 4 * dim
    assert model.pos_embed.shape == (1, 1 + 64, dim)


def test_vit_forward_is_the_cls_token_of_encode():
    model, dim = _vit()
    x = torch.randn(3, 3, 28, 28)
    tokens = model.patch_tokens(x)
    assert torch.allclose(model(x), model.encode(tokens)[:, 0], atol=1e-6)
    # Masked-image modelling encodes a subset of the patch tokens.
    assert model.encode(tokens[:, :5]).shape == (3, 6, dim)


def test_vit_position_embeddings_at_the_reference_grid_are_the_stored_ones():
    model, _ = _vit()
    stored = model.pos_embed[:, 1:]
    assert torch.equal(model.patch_position_embeddings(8, 8), stored)
    x = torch.randn(2, 3, 32, 32)
    embedded = model.patch_embed(x).flatten(2).transpose(1, 2)
    assert torch.equal(model.embed_patches(x), embedded)  # SimMIM's step before positions
    assert torch.allclose(model.patch_tokens(x), embedded + stored)


def test_vit_interpolated_position_embeddings_keep_the_grid_orientation():
    model, dim = _vit()
    # Channel 0 grows along columns, channel 1 along rows (row-major token order).
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    with torch.no_grad():
        model.pos_embed.zero_()
        model.pos_embed[0, 1:, 0] = cols.flatten()
        model.pos_embed[0, 1:, 1] = rows.flatten()
    resized = model.patch_position_embeddings(3, 5).detach().reshape(3, 5, dim)
    across, down = resized[..., 0], resized[..., 1]
    assert (across.diff(dim=1) > 0.5).all() and across.diff(dim=0).abs().max() < 1e-5
    assert (down.diff(dim=0) > 0.5).all() and down.diff(dim=1).abs().max() < 1e-5
    assert resized[..., 2:].abs().max() == 0


def test_vit_rejects_sides_not_divisible_by_the_patch_size():
    model, _ = _vit()
    with pytest.raises(ValueError, match="30x28 is not divisible by the patch size 4"):
        model(torch.randn(1, 3, 30, 28))
    with pytest.raises(ValueError, match="30x28 is not divisible by the patch size 4"):
        model.embed_patches(torch.randn(1, 3, 30, 28))


def test_vit_gradients_reach_the_patch_embedding_and_tokens():
    model, _ = _vit(in_channels=1)
    model(torch.randn(2, 1, 28, 28)).pow(2).sum().backward()
    for param in (model.patch_embed.weight, model.pos_embed, model.cls_token):
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_vit_position_embeddings_and_cls_token_get_no_weight_decay():
    backbone, dim = _vit()
    model = nn.ModuleDict({"backbone": backbone, "head": nn.Linear(dim, 4)})  # nested names
    regular, excluded = param_groups(model, weight_decay=0.05)
    excluded_ids = {id(p) for p in excluded["params"]}
    assert {id(backbone.pos_embed), id(backbone.cls_token)} <= excluded_ids
    assert excluded["weight_decay"] == 0.0
    assert all(p.ndim == 2 or p.ndim == 4 for p in regular["params"])  # linear maps, patch conv
    assert id(backbone.patch_embed.weight) in {id(p) for p in regular["params"]}
    total = len(excluded["params"]) + len(regular["params"])
    assert total == len(list(model.parameters()))


@pytest.mark.parametrize(
    ("name", "grid"), [("resnet18", 4), ("small_cnn", 4), ("vit_tiny", 7), ("resnet50", 4)]
)
def test_feature_map_is_what_forward_pools(name, grid):
    torch.manual_seed(0)
    backbone, dim = build_backbone(name, width=0.25, in_channels=1)
    backbone.eval()
    x = torch.randn(2, 1, 28, 28)
    fmap = backbone.feature_map(x)
    assert fmap.shape == (2, dim, grid, grid)
    if name.startswith("vit"):  # the CLS token is pooled by attention, not averaged
        tokens = backbone.encode(backbone.patch_tokens(x))[:, 1:]
        torch.testing.assert_close(fmap.flatten(2).transpose(1, 2), tokens)
    else:
        torch.testing.assert_close(fmap.mean((2, 3)), backbone(x))
