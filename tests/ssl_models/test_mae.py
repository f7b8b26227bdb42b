"""MAE: the encoder sees only the visible patches, the decoder puts mask tokens back in
place with fixed sine-cosine positions, training reduces the loss, checkpoints, registry."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_models import METHODS, SSLMethod, build_backbone, build_method
from ssl_models.method import Batch
from ssl_models.methods.mae import MAE, sincos_position_embeddings
from ssl_models.patches import gather_tokens, random_masking
from ssl_models.registry import method_params
from tests.ssl_models.helpers import (
    assert_state_round_trips,
    check_forward_backward,
    train_losses,
    validate_options,
)

N, SIDE = 4, 28  # 28 px: a 7x7 grid of 4 px patches


def _tiny(seed: int = 0, **options) -> MAE:
    torch.manual_seed(seed)
    backbone, dim = build_backbone("vit_tiny", width=0.25, in_channels=1, small_images=True)
    return MAE(backbone, dim, **options)


def _images(seed: int = 1, n: int = N) -> torch.Tensor:
    return torch.randn(n, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def _smooth_images(seed: int, n: int = 8) -> torch.Tensor:
    """Random 4x4 images upsampled to 28 px: patches with structure to reconstruct."""
    low = torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(low, size=(SIDE, SIDE), mode="bilinear", align_corners=False)


def _block_inputs(module: torch.nn.Module) -> list[torch.Tensor]:
    """Register a hook that records what ``module`` (a Sequential of blocks) is called on."""
    seen: list[torch.Tensor] = []
    module.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    return seen


def test_encoder_sees_only_the_visible_patch_tokens():
    model = _tiny()
    seen = _block_inputs(model.backbone.blocks)
    images = _images()
    torch.manual_seed(3)  # the mask is forward's first draw: replay it
    masking = random_masking(N, 49, 0.75)
    torch.manual_seed(3)
    out = model(Batch([images]))
    assert len(seen) == 1 and seen[0].shape == (N, 1 + 12, model.feature_dim)  # 37 masked
    visible = gather_tokens(model.backbone.patch_tokens(images), masking.ids_keep)
    assert torch.allclose(seen[0][:, 1:], visible.detach())
    assert out.logs["mask_ratio"].item() == pytest.approx(37 / 49)
    # Evaluation features: the CLS token of the whole, unmasked image.
    features = model.features(images)
    assert seen[1].shape == (N, 1 + 49, model.feature_dim)
    assert torch.equal(features, model.backbone(images))


def test_one_step_has_finite_loss_logs_and_backbone_gradients():
    model = _tiny()
    assert (
        isinstance(model, SSLMethod) and MAE.requirements(MAE.option_defaults()).global_views == 1
    )
    check_forward_backward(model, [_images()], {"loss", "mask_ratio"})
    for p in model.decoder.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_decoder_restores_the_order_with_mask_tokens_and_fixed_positions():
    model = _tiny(decoder_dim=16, decoder_depth=1, decoder_heads=2)
    decoder = model.decoder
    seen = _block_inputs(decoder.blocks)
    masking = random_masking(2, 49, 0.75, generator=torch.Generator().manual_seed(0))
    latent = torch.randn(2, 1 + 12, model.feature_dim)
    pred = decoder(latent, masking.ids_restore, 7, 7)
    assert pred.shape == (2, 49, 16)  # 4 x 4 pixels x 1 channel per patch
    tokens, embedded = seen[0], decoder.embed(latent).detach()
    pos = sincos_position_embeddings(16, 7, 7)
    assert torch.allclose(tokens[:, 0], embedded[:, 0])  # CLS, position 0
    for n in range(2):
        for j, i in enumerate(masking.ids_keep[n].tolist()):
            assert torch.allclose(tokens[n, 1 + i], embedded[n, 1 + j] + pos[i], atol=1e-6)
        for i in torch.nonzero(masking.mask[n]).flatten().tolist():
            expected = decoder.mask_token[0, 0].detach() + pos[i]
            assert torch.allclose(tokens[n, 1 + i], expected, atol=1e-6)
    # The positions are fixed: not a parameter, not in the checkpoint.
    assert not any("pos" in name for name in decoder.state_dict())


def test_sincos_position_embeddings_encode_column_then_row():
    dim, grid_h, grid_w = 8, 3, 5  # 2 frequencies per sin / cos quarter: 1 and 1/100
    emb = sincos_position_embeddings(dim, grid_h, grid_w)
    assert emb.shape == (15, 8)
    assert emb[0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    r, c = 2, 3
    row = emb[r * grid_w + c]
    expected = [math.sin(c), math.sin(c / 100), math.cos(c), math.cos(c / 100)]
    expected += [math.sin(r), math.sin(r / 100), math.cos(r), math.cos(r / 100)]
    assert row.tolist() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_embeddings(6, 2, 2)


def test_loss_decreases_on_a_fixed_batch():
    model = _tiny(seed=0)
    losses = train_losses(model, [_smooth_images(seed=10)], steps=30, lr=0.01)
    assert all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first
    # Below predicting 0, which scores (P - 1) / P = 15/16 on normalised 16-pixel patches.
    assert last < 15 / 16


def test_norm_pix_loss_off_regresses_raw_pixels():
    images = 10 + _images()  # far from 0: raw targets give a much larger loss
    torch.manual_seed(0)
    normalised = _tiny()(Batch([images])).loss.item()
    torch.manual_seed(0)
    raw = _tiny(norm_pix_loss=False)(Batch([images])).loss.item()
    assert raw > 10 * normalised


def test_rejects_a_backbone_without_patch_tokens():
    backbone, dim = build_backbone("small_cnn", width=0.25, in_channels=1)
    with pytest.raises(ValueError, match=r"SmallCNN.*model.backbone=vit_tiny, vit_small or a timm"):
        MAE(backbone, dim)
    with pytest.raises(ValueError, match="ResNet"):
        build_method("mae", backbone="resnet18", width=0.25, in_channels=1)


def test_rejects_bad_options_and_view_counts():
    with pytest.raises(ValueError, match="mask_ratio"):
        validate_options(MAE, mask_ratio=1.0)
    with pytest.raises(ValueError, match="decoder_heads"):
        validate_options(MAE, decoder_dim=30, decoder_heads=4)
    with pytest.raises(ValueError, match=r"takes \d+ views?"):
        _tiny()(Batch([_images(), _images()]))


def test_state_dict_round_trip():
    assert_state_round_trips(_tiny(seed=0), _tiny(seed=1), [_images()])


def test_registry_builds_it_with_options():
    assert METHODS["mae"] is MAE
    assert method_params("mae") == {
        "mask_ratio": 0.75,
        "decoder_dim": 128,
        "decoder_depth": 4,
        "decoder_heads": 4,
        "norm_pix_loss": True,
    }
    model = build_method(
        "mae", backbone="vit_tiny", width=0.25, in_channels=3, mask_ratio=0.5, decoder_depth=1
    )
    assert isinstance(model, MAE) and model.mask_ratio == 0.5
    assert len(model.decoder.blocks) == 1
    assert model.decoder.pred.out_features == 4 * 4 * 3
    assert model(Batch([torch.randn(2, 3, 32, 32)])).logs["mask_ratio"].item() == 0.5  # 32 of 64
