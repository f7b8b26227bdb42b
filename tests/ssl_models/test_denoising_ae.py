"""Denoising autoencoder: each corruption's exact behaviour and statistics on hand-made images,
the (emphasised) squared error by hand, gradients, other backbones, and denoising real
Fashion-MNIST better than copying the corrupted input."""

import inspect
import pickle

import pytest
import torch
import torch.nn.functional as F

from pipeline.data.ingest import ImageSpec, channel_stats, normalize, read_decoded
from ssl_models import build_backbone
from ssl_models.method import Batch
from ssl_models.methods.denoising_ae import DenoisingAutoencoder, emphasised_squared_error
from ssl_models.transforms.corrupt import Corrupt
from tests.ssl_models.helpers import tiny_backbone, validate_options


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _constant(value: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.full(shape, value, dtype=torch.uint8)


def _tiny(**options) -> DenoisingAutoencoder:
    backbone, dim = tiny_backbone(0)
    return DenoisingAutoencoder(backbone, dim, decoder_hidden=16, **options)


def _batch(corrupt: Corrupt, images: torch.Tensor, seed: int = 0):
    """The loop's inputs: normalised corrupted and clean views, and the targets."""
    cols = corrupt([images], _gen(seed))
    views = [(cols[f"view_{i}"].float() / 255 - 0.5) / 0.25 for i in range(2)]
    return views, {"corrupted": cols["target_corrupted"]}


def test_masking_zeroes_exactly_nu_d_components_of_each_image():
    clean = _constant(200, (5, 1, 8, 10))  # d = 80: 20 components at nu = 0.25
    out = Corrupt("masking", 0.25)([clean], _gen())
    assert set(out) == {"view_0", "view_1", "target_corrupted"}
    noisy, mask = out["view_0"], out["target_corrupted"]
    assert torch.equal(out["view_1"], clean)
    assert noisy.dtype == torch.uint8 and mask.dtype == torch.bool
    assert mask.shape == clean.shape
    assert mask.flatten(1).sum(1).tolist() == [20] * 5
    assert torch.equal(mask, noisy == 0)  # the chosen ones are 0, the rest untouched
    assert torch.equal(noisy[~mask], clean[~mask])
    assert len({tuple(m.flatten().tolist()) for m in mask}) == 5  # drawn per image


def test_masking_acts_on_each_channel_value_of_colour_images():
    clean = torch.randint(1, 256, (4, 3, 6, 6), generator=_gen(1), dtype=torch.uint8)
    out = Corrupt("masking", 0.3)([clean], _gen())
    mask = out["target_corrupted"]
    assert mask.flatten(1).sum(1).tolist() == [round(0.3 * 108)] * 4  # 32 of 3 * 6 * 6
    assert torch.equal(out["view_0"], torch.where(mask, 0, clean))
    channels_hit = mask.sum(1)  # (N, H, W): how many of a pixel's 3 values were masked
    assert ((channels_hit > 0) & (channels_hit < 3)).any()  # components, not whole pixels


def test_every_component_is_equally_likely_to_be_corrupted():
    clean = _constant(9, (4000, 1, 4, 4))
    mask = Corrupt("masking", 0.25)([clean], _gen(2))["target_corrupted"]
    assert mask.flatten(1).sum(1).eq(4).all()
    frequency = mask.float().mean(0)  # binomial std 0.007 per position
    assert (frequency - 0.25).abs().max() < 0.03


def test_salt_and_pepper_sets_exactly_nu_d_components_to_0_or_255_by_a_fair_coin():
    clean = _constant(100, (2000, 1, 4, 4))
    out = Corrupt("salt_pepper", 0.5)([clean], _gen(3))
    noisy, mask = out["view_0"], out["target_corrupted"]
    assert mask.flatten(1).sum(1).eq(8).all()
    assert torch.equal(mask, noisy != 100)
    salted = noisy[mask]
    assert ((salted == 0) | (salted == 255)).all()
    assert (salted == 255).float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_gaussian_adds_isotropic_noise_in_intensity_units_rounded_and_clipped():
    clean = torch.arange(128, dtype=torch.uint8).mul(2).view(2, 1, 8, 8)
    out = Corrupt("gaussian", 0.1)([clean], _gen(4))
    z = torch.randn(clean.shape, generator=_gen(4))
    expected = (clean.float() + 25.5 * z).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(out["view_0"], expected)
    assert out["target_corrupted"].all()  # every component is corrupted
    # Statistics: sigma = 0.1 of the range is 25.5 levels; clipping at the top.
    gray = Corrupt("gaussian", 0.1)([_constant(128, (1, 1, 200, 200))], _gen(5))["view_0"]
    delta = gray.float() - 128
    assert delta.mean().item() == pytest.approx(0.0, abs=0.3)
    assert delta.std().item() == pytest.approx(25.5, abs=0.4)
    bright = Corrupt("gaussian", 0.2)([_constant(250, (1, 1, 50, 50))], _gen(6))["view_0"]
    assert bright.max() == 255 and (bright == 255).float().mean() > 0.4  # P(z > 5/51) = 0.46


def test_the_data_stage_reads_the_options_is_seeded_and_pickles():
    signature = inspect.signature(DenoisingAutoencoder.__init__).parameters.values()
    defaults = {p.name: p.default for p in signature if p.kind is p.KEYWORD_ONLY}
    assert (
        DenoisingAutoencoder.requirements(DenoisingAutoencoder.option_defaults()).global_views == 1
    )
    assert DenoisingAutoencoder.requirements(defaults).pretext == Corrupt("masking", 0.25)
    make = DenoisingAutoencoder.requirements(
        defaults | {"corruption": "salt_pepper", "noise_level": 0.1}
    ).pretext
    assert make == Corrupt("salt_pepper", 0.1)
    clean = torch.randint(0, 256, (3, 3, 8, 8), generator=_gen(), dtype=torch.uint8)
    a, b = make([clean], _gen(7)), pickle.loads(pickle.dumps(make))([clean], _gen(7))
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_emphasised_squared_error_by_hand():
    pred = torch.zeros(1, 1, 2, 2, requires_grad=True)
    target = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    mask = torch.tensor([[[[True, False], [False, True]]]])
    # alpha * (1 + 16) + beta * (4 + 9), over d = 4 components
    assert emphasised_squared_error(pred, target, mask, 1.0, 0.5).item() == 23.5 / 4
    plain = emphasised_squared_error(pred, target, mask)
    assert plain.item() == 7.5 == F.mse_loss(pred, target).item()
    # Full emphasis (beta = 0): no gradient from the uncorrupted components.
    emphasised_squared_error(pred, target, mask, 2.0, 0.0).backward()
    assert pred.grad.flatten().tolist() == [2 * 2 * -1 / 4, 0.0, 0.0, 2 * 2 * -4 / 4]


def test_forward_scores_the_reconstruction_of_the_corrupted_view_against_the_clean_one():
    model = _tiny(emphasis_alpha=2.0, emphasis_beta=0.5)
    images = torch.randint(0, 256, (4, 1, 28, 28), generator=_gen(8), dtype=torch.uint8)
    views, targets = _batch(Corrupt(), images)
    out = model(Batch(views, targets=targets))
    pred = model.reconstruct(views[0])  # train-mode batch norm: the same batch, same output
    assert pred.shape == views[1].shape
    mask = targets["corrupted"]
    expected = emphasised_squared_error(pred, views[1], mask, 2.0, 0.5)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    errors = (pred - views[1]).square()
    assert set(out.logs) == {"loss", "mse", "corrupted_mse", "corrupted_fraction"}
    assert all(not v.requires_grad for v in out.logs.values())
    assert out.logs["mse"].item() == pytest.approx(errors.mean().item(), rel=1e-6)
    assert out.logs["corrupted_mse"].item() == pytest.approx(errors[mask].mean().item(), rel=1e-6)
    assert out.logs["corrupted_fraction"].item() == 0.25  # 196 of 784 pixels


def test_gradients_reach_the_backbone_and_the_decoder():
    model = _tiny()
    images = torch.randint(0, 256, (4, 1, 28, 28), generator=_gen(9), dtype=torch.uint8)
    views, targets = _batch(Corrupt(), images)
    out = model(Batch(views, targets=targets))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    for part in (model.backbone, model.decoder):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(
    ("name", "channels", "side", "extra"),
    [
        ("resnet18", 3, 32, {}),
        ("vit_tiny", 1, 28, {"small_images": True}),
        ("small_cnn", 3, 64, {}),
    ],
)
def test_other_backbones_and_image_sizes(name, channels, side, extra):
    torch.manual_seed(0)
    backbone, dim = build_backbone(name, width=0.25, in_channels=channels, **extra)
    model = DenoisingAutoencoder(backbone, dim, corruption="gaussian", decoder_hidden=8)
    images = torch.randint(0, 256, (2, channels, side, side), generator=_gen(), dtype=torch.uint8)
    views, targets = _batch(Corrupt("gaussian"), images)
    assert model.reconstruct(views[0]).shape == (2, channels, side, side)
    assert torch.isfinite(model(Batch(views, targets=targets)).loss)


def test_rejects_bad_options_and_inputs():
    with pytest.raises(ValueError, match="corruption must be one of"):
        validate_options(DenoisingAutoencoder, corruption="blur")
    for level in (0.0, 1.0):
        with pytest.raises(ValueError, match="noise_level"):
            validate_options(DenoisingAutoencoder, noise_level=level)
    with pytest.raises(ValueError, match="emphasis_alpha must be > 0"):
        validate_options(DenoisingAutoencoder, emphasis_alpha=0.0)
    with pytest.raises(ValueError, match="emphasis_beta must be >= 0"):
        validate_options(DenoisingAutoencoder, emphasis_beta=-1.0)
    clean = _constant(1, (2, 1, 28, 28))
    model = _tiny()
    views, targets = _batch(Corrupt(), clean)
    with pytest.raises(ValueError, match=r"takes \d+ views?"):
        model(Batch(views[:1], targets=targets))
    with pytest.raises(ValueError, match="no target 'corrupted'"):
        model(Batch(views))
    with pytest.raises(ValueError, match="same shape"):
        model(Batch(views, targets={"corrupted": targets["corrupted"][:, 0]}))


def test_training_on_fashion_mnist_denoises_better_than_the_corrupted_input(fmnist_small):
    pixels = read_decoded(fmnist_small["train"], ImageSpec(28, 1), 32).pixels
    mean, std = (torch.tensor(v) for v in channel_stats(pixels))
    images = torch.from_numpy(pixels)
    model = _tiny()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = _gen(10)
    losses, copy_errors = [], []
    for _ in range(30):  # a fresh corruption each step, as the data stage makes them
        cols = Corrupt()([images], gen)
        views = [normalize(cols[f"view_{i}"], mean, std) for i in range(2)]
        out = model(Batch(views, targets={"corrupted": cols["target_corrupted"]}))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        copy_errors.append(F.mse_loss(views[0], views[1]).item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first
    # Below the error of returning the corrupted input unchanged (~0.42 here, against ~0.2).
    assert last < 0.75 * sum(copy_errors[-5:]) / 5
