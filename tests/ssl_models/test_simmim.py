"""SimMIM: masked patch embeddings become the mask token before positions are added, the
encoder sees every token, L1 on the masked pixels only, square mask blocks, training,
checkpoints, registry."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_models import METHODS, SSLMethod, build_backbone, build_method
from ssl_models.method import Batch
from ssl_models.methods.simmim import SimMIM
from ssl_models.patches import patchify
from ssl_models.registry import method_params
from tests.ssl_models.helpers import (
    assert_state_round_trips,
    check_forward_backward,
    train_losses,
    validate_options,
)

N, SIDE = 4, 28  # 28 px: a 7x7 grid of 4 px patches


def _tiny(seed: int = 0, in_channels: int = 1, **options) -> SimMIM:
    torch.manual_seed(seed)
    backbone, dim = build_backbone(
        "vit_tiny", width=0.25, in_channels=in_channels, small_images=True
    )
    return SimMIM(backbone, dim, **options)


def _images(seed: int = 1, side: int = SIDE) -> torch.Tensor:
    return torch.randn(N, 1, side, side, generator=torch.Generator().manual_seed(seed))


def _fixed_mask(model: SimMIM, monkeypatch: pytest.MonkeyPatch, seed: int = 2) -> torch.Tensor:
    """Draw one mask and make ``forward`` use it."""
    torch.manual_seed(seed)
    mask = model.sample_mask(N, 7, 7, torch.device("cpu"))
    monkeypatch.setattr(model, "sample_mask", lambda *args: mask)
    return mask


def test_masked_tokens_become_the_mask_token_and_the_encoder_sees_all():
    model = _tiny()
    seen: list[torch.Tensor] = []
    model.backbone.blocks.register_forward_pre_hook(lambda _, a: seen.append(a[0].detach()))
    images = _images()
    torch.manual_seed(2)
    mask = model.sample_mask(N, 7, 7, torch.device("cpu"))
    model.reconstruct(images, mask)
    assert seen[0].shape == (N, 1 + 49, model.feature_dim)
    tokens = seen[0][:, 1:] - model.backbone.patch_position_embeddings(7, 7).detach()
    embedded = model.backbone.embed_patches(images).detach()
    mask_token = model.mask_token[0, 0].detach()
    assert torch.allclose(tokens[mask], mask_token.expand(int(mask.sum()), -1), atol=1e-6)
    assert torch.allclose(tokens[~mask], embedded[~mask], atol=1e-6)
    assert not torch.allclose(embedded[mask], mask_token.expand(int(mask.sum()), -1))


def test_loss_is_l1_over_the_masked_pixels_only(monkeypatch):
    model = _tiny()
    images = _images()
    mask = _fixed_mask(model, monkeypatch)
    assert mask.sum(dim=1).tolist() == [29] * N  # round(49 * 0.6) patches each
    out = model(Batch([images]))
    error = (model.reconstruct(images, mask) - patchify(images, 4)).abs()
    assert out.loss.item() == pytest.approx(error[mask].mean().item(), rel=1e-5)
    assert out.logs["mask_ratio"].item() == pytest.approx(29 / 49)
    # Raw pixels by default; norm_pix_loss normalises the targets per patch.
    normed = _tiny(norm_pix_loss=True)
    monkeypatch.setattr(normed, "sample_mask", lambda *args: mask)
    assert normed(Batch([images])).loss.item() != pytest.approx(out.loss.item(), rel=1e-3)


def test_one_step_has_finite_loss_logs_and_backbone_gradients():
    model = _tiny()
    assert (
        isinstance(model, SSLMethod)
        and SimMIM.requirements(SimMIM.option_defaults()).global_views == 1
    )
    check_forward_backward(model, [_images()], {"loss", "mask_ratio"})
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    assert model.head.weight.grad is not None


def test_mask_patch_size_masks_square_blocks():
    model = _tiny(mask_patch_size=8)  # 2x2 patches per block
    torch.manual_seed(0)
    mask = model.sample_mask(N, 8, 8, torch.device("cpu"))  # 32 px images
    grid = mask.reshape(N, 4, 2, 4, 2)  # (block row, row in block, block col, col in block)
    assert (grid == grid[:, :, :1, :, :1]).all()  # each 2x2 block all masked or all not
    assert grid[:, :, 0, :, 0].sum(dim=(1, 2)).tolist() == [10] * N  # round(16 * 0.6)
    assert model(Batch([_images(side=32)])).logs["mask_ratio"].item() == pytest.approx(40 / 64)
    # Default: one patch per block.
    assert _tiny().mask_patch_size == 4
    with pytest.raises(ValueError, match="7x7 grid.*8 px mask blocks"):
        model(Batch([_images()]))  # 28 px: 7 patches do not split into pairs
    with pytest.raises(ValueError, match="multiple of the patch size 4"):
        _tiny(mask_patch_size=6)


def test_loss_decreases_on_a_fixed_batch():
    model = _tiny(seed=0)
    low = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(10))
    # Smooth patterns (upsampled 4x4 noise) around an offset the head must learn.
    images = 1 + F.interpolate(low, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
    losses = train_losses(model, [images], steps=30, lr=0.05)
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5


def test_features_are_the_cls_token_of_the_unmasked_image():
    model = _tiny().eval()
    images = _images()
    assert torch.equal(model.features(images), model.backbone(images))


def test_rejects_a_backbone_without_patch_tokens_and_bad_options():
    backbone, dim = build_backbone("small_cnn", width=0.25, in_channels=1)
    with pytest.raises(ValueError, match=r"SimMIM.*SmallCNN.*model.backbone=vit_tiny"):
        SimMIM(backbone, dim)
    with pytest.raises(ValueError, match="mask_ratio"):
        validate_options(SimMIM, mask_ratio=0.0)
    with pytest.raises(ValueError, match=r"takes \d+ views?"):
        _tiny()(Batch([_images(), _images()]))


def test_state_dict_round_trip():
    model = _tiny(seed=0)
    assert "mask_token" in model.state_dict()
    assert_state_round_trips(model, _tiny(seed=1), [_images()])


def test_registry_builds_it_with_options():
    assert METHODS["simmim"] is SimMIM
    assert method_params("simmim") == {
        "mask_ratio": 0.6,
        "mask_patch_size": 0,
        "norm_pix_loss": False,
    }
    model = build_method(
        "simmim", backbone="vit_tiny", width=0.25, in_channels=3, mask_ratio=0.5, mask_patch_size=8
    )
    assert isinstance(model, SimMIM) and model.mask_patch_size == 8
    assert model.head.out_features == 4 * 4 * 3
    assert model(Batch([torch.randn(2, 3, 32, 32)])).logs["mask_ratio"].item() == 0.5
