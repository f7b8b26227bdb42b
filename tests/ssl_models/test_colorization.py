"""Colorization: the data stage's lightness view and ab targets on a hand-made image, the
refusal of 1-channel images, the rebalanced soft-target loss recomputed densely, the bin
counts (masked gray images, summed over workers, checkpointed) and training on colour blobs."""

import inspect
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from ssl_models import SSLMethod, build_backbone
from ssl_models.lab_color import ab_bins, rebalancing_weights, smoothed_distribution, soft_encode
from ssl_models.method import Batch
from ssl_models.methods import colorization
from ssl_models.methods.colorization import Colorization
from ssl_models.transforms.lightness import ColorizationViews
from tests.ssl_models.helpers import validate_options

# Four colours of distinct lightness (L about 19, 43, 64 and 86): gray level tells the colour.
PALETTE = torch.tensor([[20, 30, 140], [200, 30, 30], [60, 170, 60], [240, 220, 60]])


def _model(seed: int = 0, backbone: str = "small_cnn", **options) -> Colorization:
    torch.manual_seed(seed)
    encoder, dim = build_backbone(backbone, width=0.25, in_channels=3)
    return Colorization(encoder, dim, decoder_hidden=32, **options)


def _blobs(n: int, seed: int) -> torch.Tensor:
    """uint8 (n, 3, 32, 32) images of 8 px blocks, each one palette colour at random."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randint(0, len(PALETTE), (n, 4, 4), generator=g)
    pixels = PALETTE[cells].permute(0, 3, 1, 2).to(torch.uint8)
    return pixels.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)


def _inputs(images: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """The data stage, then the training loop's normalisation (mean 0.5, std 0.25)."""
    columns = ColorizationViews()([images], torch.Generator().manual_seed(0))
    view = (columns["view_0"].float() / 255 - 0.5) / 0.25
    return [view], {"ab": columns["target_ab"]}


def test_data_stage_renders_lightness_and_subsamples_ab():
    # White 8 x 8 image; the top-left pixel of each 4 x 4 block is red, green, blue, black.
    image = torch.full((1, 3, 8, 8), 255, dtype=torch.uint8)
    corners = {(0, 0): (255, 0, 0), (0, 4): (0, 255, 0), (4, 0): (0, 0, 255), (4, 4): (0, 0, 0)}
    for (y, x), colour in corners.items():
        image[0, :, y, x] = torch.tensor(colour, dtype=torch.uint8)
    columns = ColorizationViews(stride=4)([image], torch.Generator())
    assert set(columns) == {"view_0", "target_ab"}
    gray, ab = columns["view_0"], columns["target_ab"]
    assert gray.dtype == torch.uint8 and gray.shape == (1, 3, 8, 8)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 0], gray[:, 2])
    # round(L * 255 / 100): red 53.24 -> 136, green 87.73 -> 224, blue 32.30 -> 82, white 255.
    assert [gray[0, 0, y, x].item() for y, x in corners] == [136, 224, 82, 0]
    assert gray[0, 0, 1, 1].item() == 255
    assert ab.dtype == torch.float32 and ab.shape == (1, 2, 2, 2)
    expected = [[[80.0925, -86.1827], [79.1875, 0.0]], [[67.2032, 83.1793], [-107.8602, 0.0]]]
    assert torch.allclose(ab[0], torch.tensor(expected), atol=2e-3)
    # 32 px -> 8 x 8 targets, 28 px -> 7 x 7 (the prediction resolution).
    assert ColorizationViews()([_blobs(2, 0)], torch.Generator())["target_ab"].shape[-2:] == (8, 8)
    images = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
    seven = ColorizationViews()([images], torch.Generator())["target_ab"]
    assert seven.shape[-2:] == (7, 7)


def test_refuses_single_channel_images():
    assert (
        Colorization.requirements(Colorization.option_defaults()).input_channels == 3
        and Colorization.requirements(Colorization.option_defaults()).global_views == 1
    )
    gray = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    with pytest.raises(ValueError, match="needs 3-channel RGB images.*shape \\(2, 1, 28, 28\\)"):
        ColorizationViews()([gray], torch.Generator())


def test_pretext_views_follow_the_options_and_pickle():
    signature = inspect.signature(Colorization.__init__).parameters.values()
    options = {p.name: p.default for p in signature if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert options == {
        "neighbours": 5,
        "sigma": 5.0,
        "smoothing_sigma": 5.0,
        "rebalance_mix": 0.5,
        "target_stride": 4,
        "decoder_hidden": 256,
        "decoder_upsamplings": 1,
    }
    make = Colorization.requirements(options | {"target_stride": 2}).pretext
    assert make == ColorizationViews(stride=2) and pickle.loads(pickle.dumps(make)) == make


def test_one_step_has_finite_loss_logs_and_backbone_gradients():
    model = _model()
    assert isinstance(model, SSLMethod) and model.decoder.out.out_channels == len(ab_bins())
    views, targets = _inputs(_blobs(4, 0))
    out = model(Batch(views, targets=targets))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert set(out.logs) == {"loss", "pretext_accuracy"}
    assert all(not v.requires_grad for v in out.logs.values())
    out.loss.backward()
    grads = [p.grad for p in model.backbone.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_loss_is_the_rebalanced_soft_cross_entropy():
    model = _model()
    captured = []
    model.decoder.register_forward_hook(lambda m, args, out: captured.append(out.detach()))
    views, targets = _inputs(_blobs(3, 1))
    targets["ab"] = targets["ab"] + torch.randn(targets["ab"].shape) * 6  # off-centre colours
    out = model(Batch(views, targets=targets))
    logits = captured[0].permute(0, 2, 3, 1).reshape(-1, len(ab_bins()))  # (P, Q)
    points = targets["ab"].permute(0, 2, 3, 1).reshape(-1, 2)
    index, soft = soft_encode(points, ab_bins())
    z = torch.zeros_like(logits).scatter_(1, index, soft)  # the dense soft target Z
    assert torch.allclose(z.sum(1), torch.ones(len(z)))
    nearest = z.argmax(1)
    assert torch.equal(model.bin_counts, torch.bincount(nearest, minlength=len(z[0])))
    w = rebalancing_weights(smoothed_distribution(model.bin_counts, ab_bins()), 0.5)
    per_pixel = -(z * F.log_softmax(logits, dim=1)).sum(1)
    expected = (w.float()[nearest] * per_pixel).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    accuracy = (logits.argmax(1) == nearest).float().mean()
    assert out.logs["pretext_accuracy"].item() == pytest.approx(accuracy.item())


def test_gray_images_are_masked_and_not_counted():
    model = _model()
    views, targets = _inputs(_blobs(2, 2))
    targets["ab"][0] = torch.empty_like(targets["ab"][0]).uniform_(-4.9, 4.9)  # image 0: gray
    model(Batch(views, targets=targets))
    assert model.bin_counts.sum().item() == 64  # image 1's 8 x 8 pixels only
    targets["ab"][1] = 0.0
    out = model(Batch(views, targets=targets))
    assert out.loss.item() == 0.0 and model.bin_counts.sum().item() == 64
    model.eval()
    views, targets = _inputs(_blobs(2, 3))
    model(Batch(views, targets=targets))
    assert model.bin_counts.sum().item() == 64  # evaluation does not count


def test_rejects_bad_options_and_inputs():
    with pytest.raises(ValueError, match="rebalance_mix"):
        validate_options(Colorization, rebalance_mix=0.0)
    with pytest.raises(ValueError, match="neighbours"):
        validate_options(Colorization, neighbours=0)
    with pytest.raises(ValueError, match="sigma"):
        validate_options(Colorization, sigma=-1.0)
    views, _ = _inputs(_blobs(2, 0))
    with pytest.raises(ValueError, match="no target 'ab'"):
        _model()(Batch(views))


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny"])
def test_other_backbones_predict_at_the_target_size(name):
    model = _model(backbone=name)
    captured = []
    model.decoder.register_forward_hook(lambda m, args, out: captured.append(out))
    views, targets = _inputs(_blobs(2, 0))
    assert math.isfinite(model(Batch(views, targets=targets)).loss.item())
    assert captured[0].shape == (2, len(ab_bins()), 8, 8)


def test_training_on_colour_blobs_lowers_the_loss_and_learns_the_colours():
    model = _model(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses, accuracies = [], []
    for step in range(40):
        views, targets = _inputs(_blobs(16, seed=100 + step))  # fresh images every step
        out = model(Batch(views, targets=targets))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        accuracies.append(out.logs["pretext_accuracy"].item())
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.4 * sum(losses[:5]) / 5
    # Chance is 1 / 261; always naming the most frequent of the 4 colours scores about 1 / 4.
    assert accuracies[0] < 0.1 and sum(accuracies[-5:]) / 5 > 0.65
    assert (model.bin_counts > 0).sum().item() == 4  # one bin per palette colour


def test_state_dict_round_trip_keeps_the_counts():
    model, fresh = _model(seed=0), _model(seed=1)
    views, targets = _inputs(_blobs(4, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(Batch(views, targets=targets)).loss.backward()
    opt.step()
    assert "bin_counts" in model.state_dict() and "bins" not in model.state_dict()
    fresh.load_state_dict(model.state_dict())
    for (key, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    assert model.bin_counts.sum().item() == 4 * 64
    loss = model(Batch(views, targets=targets)).loss
    assert torch.equal(fresh(Batch(views, targets=targets)).loss, loss)


def test_bin_counts_are_summed_over_workers(monkeypatch):
    other_worker = torch.zeros(len(ab_bins()), dtype=torch.long)
    other_worker[[0, 7]] = torch.tensor([5, 1])

    def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:  # a second worker's counts arrive
        return tensor.add_(other_worker)

    monkeypatch.setattr(colorization, "all_reduce_sum", all_reduce_sum)
    model = _model()
    model.count_bins(torch.tensor([0, 3, 3]))
    expected = other_worker.clone()
    expected[[0, 3]] += torch.tensor([1, 2])
    assert torch.equal(model.bin_counts, expected)
