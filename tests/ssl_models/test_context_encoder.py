"""Context encoder: the three region masks by hand, the overlap border, the weighted masked
L2 loss by hand, the encoder seeing the mean-filled hole, gradients, any backbone and image
size, and inpainting Fashion-MNIST better than the mean fill after a few dozen steps."""

import pytest
import torch
import torch.nn.functional as F

from ssl_models import SSLMethod, build_backbone
from ssl_models.backbones import image_channels
from ssl_models.method import Batch
from ssl_models.methods.context_encoder import (
    ChannelWiseFC,
    ContextEncoder,
    context_encoder_loss,
    overlap_border,
)
from ssl_models.transforms.holes import (
    BLOCK_TRIES,
    REGION_CELLS,
    HoleMasks,
    central_block,
    random_blocks,
    random_region,
)
from tests.ssl_models.helpers import tiny_backbone, validate_options

FMNIST_MEAN, FMNIST_STD = 0.286, 0.353


def _model(seed: int = 0, **options) -> ContextEncoder:
    backbone, dim = tiny_backbone(seed)
    return ContextEncoder(backbone, dim, **options)


def _images(n: int = 4, side: int = 28, channels: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, channels, side, side, generator=torch.Generator().manual_seed(seed))


def _inputs(uint8: torch.Tensor, seed: int = 0, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """What the loop feeds forward: the normalised view_0 and the hole."""
    out = HoleMasks(**options)([uint8], torch.Generator().manual_seed(seed))
    return (out["view_0"] / 255 - FMNIST_MEAN) / FMNIST_STD, out["target_mask"]


def test_central_block_is_the_middle_half_of_each_side():
    for side, first, last in ((28, 7, 20), (32, 8, 23)):
        mask = central_block(2, side, side)
        assert mask.dtype == torch.bool and mask.shape == (2, side, side)
        rows, cols = torch.nonzero(mask[0], as_tuple=True)
        assert (rows.min(), rows.max(), cols.min(), cols.max()) == (first, last, first, last)
        assert mask.sum(dim=(1, 2)).tolist() == [(side // 2) ** 2] * 2  # a quarter, all filled
    mask = central_block(1, 28, 32)[0]  # non-square: rows 7-20, columns 8-23
    expected = torch.zeros(28, 32, dtype=torch.bool)
    expected[7:21, 8:24] = True
    assert torch.equal(mask, expected)


def test_random_blocks_cover_up_to_a_quarter_with_the_drawn_squares():
    g = torch.Generator().manual_seed(0)
    masks = random_blocks(256, 28, 28, 0.25, g)
    coverage = masks.float().mean(dim=(1, 2))
    assert (coverage <= 0.25).all() and (coverage >= 0.2).all()  # "up to 1/4", close to it
    assert coverage.mean() > 0.24
    assert len({tuple(m.flatten().tolist()) for m in masks[:16]}) == 16  # drawn per image
    # Replay the draws: the first candidate (at most 7x7 = 1/16 of the image) always fits.
    g = torch.Generator().manual_seed(3)
    sizes = torch.randint(4, 8, (BLOCK_TRIES, 2), generator=g)  # 28 px: sides 4 to 7
    tops = (torch.rand(BLOCK_TRIES, 2, generator=g) * (28 - sizes + 1)).long()
    lefts = (torch.rand(BLOCK_TRIES, 2, generator=g) * (28 - sizes + 1)).long()
    masks = random_blocks(2, 28, 28, 0.25, torch.Generator().manual_seed(3))
    for i in range(2):
        s, t, left = sizes[0, i].item(), tops[0, i].item(), lefts[0, i].item()
        assert t + s <= 28 and left + s <= 28
        assert masks[i, t : t + s, left : left + s].all()
    # A budget below the smallest block (4x4 = 16 px of 784) leaves no hole at all.
    assert not random_blocks(3, 28, 28, 15 / 784, torch.Generator().manual_seed(0)).any()


def test_random_region_masks_the_lowest_quarter_of_smooth_noise():
    g = torch.Generator().manual_seed(4)
    noise = torch.rand(3, 1, REGION_CELLS, REGION_CELLS, generator=g)
    smooth = F.interpolate(noise, size=(32, 32), mode="bicubic", align_corners=False)[:, 0]
    masks = random_region(3, 32, 32, 0.25, torch.Generator().manual_seed(4))
    assert masks.sum(dim=(1, 2)).tolist() == [256] * 3  # exactly a quarter of 32 x 32
    for mask, values in zip(masks, smooth, strict=True):
        assert values[mask].max() < values[~mask].min()


def test_data_stage_passes_the_image_and_draws_the_hole_from_the_generator():
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    make = ContextEncoder.requirements(
        {"mask_shape": "random_blocks", "coverage": 0.25, "overlap": 0.0}
    ).pretext
    torch.manual_seed(0)
    state = torch.get_rng_state()
    out = make([images], torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    assert set(out) == {"view_0", "target_mask"}
    assert out["view_0"] is images  # uint8, unmasked: the loop normalises, forward masks
    assert out["target_mask"].dtype == torch.bool and out["target_mask"].shape == (5, 32, 32)
    again = make([images], torch.Generator().manual_seed(7))
    assert torch.equal(again["target_mask"], out["target_mask"])
    central = HoleMasks("central_block")([images], torch.Generator())
    assert torch.equal(central["target_mask"], central_block(5, 32, 32))
    with pytest.raises(ValueError, match="mask_shape"):
        validate_options(ContextEncoder, mask_shape="random_squares")
    with pytest.raises(ValueError, match="coverage"):
        validate_options(ContextEncoder, coverage=1.0)


def test_overlap_border_is_the_ring_around_the_hole():
    hole = central_block(1, 28, 28)
    border = overlap_border(hole, 2)[0]
    ring = torch.zeros(28, 28, dtype=torch.bool)
    ring[5:23, 5:23] = True
    ring[7:21, 7:21] = False
    assert torch.equal(border, ring)
    corner = torch.zeros(1, 6, 6, dtype=torch.bool)
    corner[0, 0, 0] = True  # clipped at the image edge: (0,1), (1,0), (1,1)
    assert overlap_border(corner, 1)[0].nonzero().tolist() == [[0, 1], [1, 0], [1, 1]]
    assert not overlap_border(hole, 0).any()


def test_loss_by_hand_on_a_tiny_image():
    # One 2-channel 1x3 image: hole at the middle pixel, border on its left, right ignored.
    images = torch.tensor([[[[1.0, 2.0, 3.0]], [[0.0, -1.0, 5.0]]]])
    pred = torch.tensor([[[[0.0, 0.0, 0.0]], [[2.0, 1.0, 0.0]]]])
    hole = torch.tensor([[[False, True, False]]])
    border = torch.tensor([[[True, False, False]]])
    # Hole: (0-2)^2 + (1+1)^2 = 8, weight 1; border: (0-1)^2 + (2-0)^2 = 5, weight 10.
    # Averaged with the weights, over both channels: (8 + 10 * 5) / ((1 + 10) * 2).
    loss = context_encoder_loss(pred, images, hole, border, 10.0)
    assert loss.item() == pytest.approx(58 / 22)
    assert context_encoder_loss(pred, images, hole, torch.zeros_like(border), 1.0).item() == 4.0


def test_loss_ignores_the_context_outside_the_predicted_region():
    images, pred = _images(2, 8), _images(2, 8, seed=2).requires_grad_()
    hole = central_block(2, 8, 8)
    border = overlap_border(hole, 1)
    loss = context_encoder_loss(pred, images, hole, border, 10.0)
    loss.backward()
    outside = ~(hole | border)[:, None].expand_as(pred)
    assert outside.any() and (pred.grad[outside] == 0).all()
    assert (pred.grad[~outside] != 0).all()
    changed = images.clone()
    changed[outside] = 100.0
    assert context_encoder_loss(pred, changed, hole, border, 10.0).item() == loss.item()
    # The border's weight matters: 10x there is not the same loss as 1x.
    assert context_encoder_loss(pred, images, hole, border, 1.0).item() != loss.item()


def test_encoder_sees_the_hole_filled_with_the_mean_and_the_hole_is_the_target():
    model = _model()
    seen = []
    model.backbone.features[0].register_forward_pre_hook(lambda _, a: seen.append(a[0]))
    images, hole = _images(), central_block(4, 28, 28)
    out = model(Batch([images], targets={"mask": hole}))
    expected = images.clone()
    expected[hole[:, None]] = 0.0  # the normalised mean
    assert torch.equal(seen[0], expected)
    assert out.logs["hole_fraction"].item() == 0.25
    # Changing the hidden pixels changes only the target, not what the encoder sees.
    other = images.clone()
    other[hole[:, None]] += 1.0
    model.eval()
    with torch.no_grad():
        a = model(Batch([images], targets={"mask": hole})).logs["hole_mse"]
        b = model(Batch([other], targets={"mask": hole})).logs["hole_mse"]
    assert torch.equal(seen[-1], seen[-2]) and a != b


def test_one_step_has_finite_loss_logs_and_gradients_everywhere():
    model = _model()
    assert (
        isinstance(model, SSLMethod)
        and ContextEncoder.requirements(ContextEncoder.option_defaults()).global_views == 1
    )
    hole = random_region(4, 28, 28, 0.25, torch.Generator().manual_seed(0))
    out = model(Batch([_images()], targets={"mask": hole}))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert set(out.logs) == {"loss", "hole_mse", "hole_fraction"}
    assert all(not v.requires_grad for v in out.logs.values())
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad.abs().sum() > 0 for p in model.backbone.parameters() if p.ndim > 1)
    assert model.channel_fc.weight.grad.abs().sum() > 0


def test_channel_wise_fc_connects_positions_within_a_channel_only():
    layer = ChannelWiseFC(3, 2)
    assert layer.weight.shape == (3, 4, 4)  # m * n^4 weights
    x = torch.zeros(1, 3, 2, 2)
    x[0, 1, 0, 0] = 1.0  # one unit of channel 1
    y = layer(x)
    assert torch.equal(y[0, 0], torch.zeros(2, 2)) and torch.equal(y[0, 2], torch.zeros(2, 2))
    assert torch.allclose(y[0, 1].flatten(), layer.weight[1, 0].detach())
    assert layer(torch.randn(2, 3, 7, 7)).shape == (2, 3, 2, 2)  # other maps pooled first


@pytest.mark.parametrize(
    ("backbone", "channels", "side"),
    [("vit_tiny", 1, 28), ("resnet18", 3, 32), ("small_cnn", 3, 64)],
)
def test_other_backbones_and_image_sizes(backbone, channels, side):
    torch.manual_seed(0)
    net, dim = build_backbone(backbone, width=0.25, in_channels=channels)
    model = ContextEncoder(net, dim, mask_shape="random_blocks")
    assert image_channels(net) == channels
    images = _images(2, side, channels)
    hole = random_blocks(2, side, side, 0.25, torch.Generator().manual_seed(0))
    out = model(Batch([images], targets={"mask": hole}))
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.decoder.out.out_channels == channels
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_rejects_bad_options_and_inputs():
    with pytest.raises(ValueError, match="mask_shape"):
        validate_options(ContextEncoder, mask_shape="ring")
    with pytest.raises(ValueError, match="overlap"):
        validate_options(ContextEncoder, overlap=0.5)
    with pytest.raises(ValueError, match="overlap_weight"):
        validate_options(ContextEncoder, overlap_weight=0.0)
    model, hole = _model(), central_block(4, 28, 28)
    with pytest.raises(ValueError, match=r"takes \d+ views?"):
        model(Batch([_images(), _images()], targets={"mask": hole}))
    with pytest.raises(ValueError, match="no target"):
        model(Batch([_images()]))
    with pytest.raises(ValueError, match="does not match"):
        model(Batch([_images()], targets={"mask": hole[:, :20]}))


def test_state_dict_round_trip():
    model, fresh = _model(0), _model(1)
    images, hole = _images(), central_block(4, 28, 28)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(Batch([images], targets={"mask": hole})).loss.backward()
    opt.step()
    fresh.load_state_dict(model.state_dict())
    assert "channel_fc.weight" in model.state_dict()
    assert torch.equal(
        fresh(Batch([images], targets={"mask": hole})).loss,
        model(Batch([images], targets={"mask": hole})).loss,
    )


def test_training_on_fashion_mnist_inpaints_unseen_images_better_than_the_mean(
    fmnist_small, one_thread
):
    from pipeline.data.ingest import ImageSpec, read_decoded

    pixels = torch.from_numpy(read_decoded(fmnist_small["train"], ImageSpec(28, 1), 640).pixels)
    train, held_out = pixels[:512], pixels[512:]
    model = _model(0, decoder_hidden=16)  # random-region holes, the default
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(30):
        batch = train[torch.randint(0, len(train), (32,), generator=g)]
        images, hole = _inputs(batch, seed=step)
        out = model(Batch([images], targets={"mask": hole}))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    model.eval()
    images, hole = _inputs(held_out, seed=100)
    with torch.no_grad():
        hole_mse = model(Batch([images], targets={"mask": hole})).logs["hole_mse"].item()
    mean_fill = images.square()[hole[:, None]].mean().item()  # predicting 0: the mean
    assert hole_mse < 0.6 * mean_fill
