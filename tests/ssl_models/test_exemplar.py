"""Exemplar CNN: each elementary transformation on hand-made images, the surrogate labels and
loss by hand, and surrogate-class accuracy rising on real Fashion-MNIST seeds."""

import inspect
import math

import pytest
import torch
from torch import nn

from ssl_models import build_backbone
from ssl_models.method import Batch
from ssl_models.methods.exemplar import ExemplarCNN
from ssl_models.transforms.exemplar import (
    ExemplarTransforms,
    affine_patches,
    hsv_jitter,
    hsv_to_rgb,
    pca_contrast,
    pixel_components,
    rgb_to_hsv,
)
from tests.ssl_models.helpers import validate_options


def _options(**changes) -> dict:
    """The method's options, defaults filled in, as the pipeline hands them to the data stage."""
    signature = inspect.signature(ExemplarCNN.__init__)
    defaults = {
        p.name: p.default
        for p in signature.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    return defaults | changes


def _one(value: float) -> torch.Tensor:
    return torch.tensor([value])


def _dot(size: int, row: int, col: int) -> torch.Tensor:
    image = torch.zeros(1, 1, size, size)
    image[0, 0, row, col] = 1.0
    return image


def test_rotation_by_90_degrees_moves_a_pixel_exactly():
    # 9x9 image, pixel 3 rows above the centre (4, 4); the content turns counter-clockwise.
    out = affine_patches(_dot(9, 1, 4), _one(90.0), _one(1.0), torch.zeros(1, 2))
    torch.testing.assert_close(out, _dot(9, 4, 1))
    out = affine_patches(_dot(9, 1, 4), _one(-90.0), _one(1.0), torch.zeros(1, 2))
    torch.testing.assert_close(out, _dot(9, 4, 7))


def test_rotation_by_20_degrees_moves_a_blob_along_its_circle():
    # A Gaussian blob 10 px right of the centre of a 33x33 image ends 20 degrees
    # counter-clockwise on screen: up (smaller row) by 10 sin 20, left by 10 (1 - cos 20).
    ys, xs = torch.meshgrid(torch.arange(33.0), torch.arange(33.0), indexing="ij")
    blob = torch.exp(-((ys - 16) ** 2 + (xs - 26) ** 2) / 4).view(1, 1, 33, 33)
    out = affine_patches(blob, _one(20.0), _one(1.0), torch.zeros(1, 2), padding="zeros")[0, 0]
    row, col = (out * ys).sum() / out.sum(), (out * xs).sum() / out.sum()
    angle = math.radians(20)
    assert row.item() == pytest.approx(16 - 10 * math.sin(angle), abs=0.05)
    assert col.item() == pytest.approx(16 + 10 * math.cos(angle), abs=0.05)


def test_scale_and_translation():
    square = torch.zeros(1, 1, 32, 32)
    square[..., 12:20, 12:20] = 1.0  # 8x8, centred
    zoomed = affine_patches(square, _one(0.0), _one(0.5), torch.zeros(1, 2))[0, 0]
    # Window half as large: the square doubles to 16x16 (bilinear edges), still centred.
    assert zoomed.sum().item() == pytest.approx(4 * 64)
    torch.testing.assert_close(
        zoomed[16, 6:26], torch.tensor([0, 0.25, 0.75] + [1.0] * 14 + [0.75, 0.25, 0])
    )
    torch.testing.assert_close(zoomed, zoomed.T)
    # Window moved a quarter side (8 px) right and down: the content moves 8 px up-left.
    moved = affine_patches(square, _one(0.0), _one(1.0), torch.tensor([[0.25, 0.25]]), "zeros")
    expected = torch.zeros_like(square)
    expected[..., 4:12, 4:12] = 1.0
    torch.testing.assert_close(moved, expected)


def test_pca_contrast_scales_each_principal_component():
    # RGB pixels 0.5 + a u + b v with u = (1, 1, 1)/sqrt(3), v = (1, -1, 0)/sqrt(2) and
    # (a, b) = (+-0.2, +-0.05) in all four combinations equally often: exactly uncorrelated.
    a = torch.tensor([0.2, 0.2, -0.2, -0.2]).repeat(8).view(2, 1, 4, 4)
    b = torch.tensor([0.05, -0.05, 0.05, -0.05]).repeat(8).view(2, 1, 4, 4)
    u = torch.tensor([1.0, 1.0, 1.0]).view(1, 3, 1, 1) / math.sqrt(3)
    v = torch.tensor([1.0, -1.0, 0.0]).view(1, 3, 1, 1) / math.sqrt(2)
    images = 0.5 + a * u + b * v
    mean, components = pixel_components(images)
    torch.testing.assert_close(mean, torch.full((3,), 0.5))
    # eigh sorts eigenvalues ascending: u is the last component, v the middle one.
    assert abs(components[:, 2] @ u.flatten()) == pytest.approx(1.0, abs=1e-5)
    assert abs(components[:, 1] @ v.flatten()) == pytest.approx(1.0, abs=1e-5)
    # Factors 2 on u's projection, 0.5 on v's (the third direction has no variance).
    out = pca_contrast(images, torch.tensor([[3.0, 0.5, 2.0]]).expand(2, 3), mean, components)
    torch.testing.assert_close(out, 0.5 + 2 * a * u + 0.5 * b * v)
    g = torch.Generator().manual_seed(0)
    # One channel: deviations from the mean intensity times the factor.
    gray = torch.rand(4, 1, 5, 5, generator=g)
    mean, components = pixel_components(gray)
    out = pca_contrast(gray, torch.full((4, 1), 1.5), mean, components)
    torch.testing.assert_close(out, gray.mean() + 1.5 * (gray - gray.mean()))


def test_hsv_round_trip_and_hue_shift_of_pure_colours():
    colours = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(hsv_to_rgb(rgb_to_hsv(colours)), colours)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    identity = (torch.ones(1, 2), torch.ones(1, 2), torch.zeros(1, 2))
    # A third of a turn: red -> green; a tenth (36 degrees): orange (1, 0.6, 0).
    green = hsv_jitter(red, *identity, _one(1 / 3))
    torch.testing.assert_close(green, torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1).expand_as(red))
    orange = hsv_jitter(red, *identity, _one(0.1))
    torch.testing.assert_close(orange[0, :, 0, 0], torch.tensor([1.0, 0.6, 0.0]))
    # Negative shifts wrap around: red minus a third of a turn is blue.
    blue = hsv_jitter(red, *identity, _one(-1 / 3))
    torch.testing.assert_close(blue[0, :, 0, 0], torch.tensor([0.0, 0.0, 1.0]))


def test_contrast_2_raises_s_and_v_to_a_power_times_a_factor_plus_an_offset():
    # (0.8, 0.4, 0.4): H = 0, S = 0.5, V = 0.8. S -> 1.2 * 0.5^2 + 0.1 = 0.4,
    # V -> 0.9 * 0.8^0.5 - 0.05; the hue is kept (red), so R = V, G = B = V (1 - S).
    pixel = torch.tensor([0.8, 0.4, 0.4]).view(1, 3, 1, 1)
    out = hsv_jitter(
        pixel,
        torch.tensor([[2.0, 0.5]]),
        torch.tensor([[1.2, 0.9]]),
        torch.tensor([[0.1, -0.05]]),
        _one(0.0),
    )
    value = 0.9 * math.sqrt(0.8) - 0.05
    torch.testing.assert_close(out.flatten(), torch.tensor([value, 0.6 * value, 0.6 * value]))
    # One channel: the intensity is V; the S column and the hue are ignored.
    gray = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 1, 3)
    out = hsv_jitter(
        gray,
        torch.tensor([[3.0, 2.0]]),
        torch.tensor([[5.0, 1.2]]),
        torch.tensor([[0.3, 0.1]]),
        _one(0.4),
    )
    torch.testing.assert_close(out.flatten(), torch.tensor([0.1, 0.4, 1.0]))  # 1.3 clamps


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32), (3, 64)])
def test_data_stage_makes_k_transformed_uint8_views(channels, size):
    make = ExemplarCNN.requirements(_options()).pretext
    g = torch.Generator().manual_seed(0)
    views = [torch.randint(0, 256, (5, channels, size, size), dtype=torch.uint8, generator=g)] * 3
    columns = make(views, torch.Generator().manual_seed(1))
    assert set(columns) == {"view_0", "view_1", "view_2"}  # no targets: the labels are indices
    for column in columns.values():
        assert column.dtype == torch.uint8 and column.shape == views[0].shape
    # Same base crop, independent transformations.
    assert not torch.equal(columns["view_0"], columns["view_1"])
    again = make(views, torch.Generator().manual_seed(1))
    assert all(torch.equal(again[k], columns[k]) for k in columns)


def test_data_stage_without_transformations_is_the_identity():
    flat = _options(
        translation=0.0,
        scale_min=1.0,
        scale_max=1.0,
        rotation=0.0,
        pca_factor=1.0,
        hsv_power=1.0,
        hsv_factor_min=1.0,
        hsv_factor_max=1.0,
        hsv_offset=0.0,
        hue_shift=0.0,
    )
    make = ExemplarCNN.requirements(flat).pretext
    assert isinstance(make, ExemplarTransforms)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    out = make([images], torch.Generator().manual_seed(0))["view_0"]
    assert (out.int() - images.int()).abs().max() <= 1  # float round trip


class _Features(nn.Module):
    """(N, 2, 1, 1) -> (N, 2): the "images" are their own features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def test_labels_are_the_indices_and_the_loss_is_cross_entropy_by_hand():
    method = ExemplarCNN(_Features(), 2, 3, hidden_dim=0)
    with torch.no_grad():  # logits = (x0, x1, x0 + x1)
        method.classifier[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        method.classifier[0].bias.zero_()
    view_a = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).view(2, 2, 1, 1)
    view_b = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).view(2, 2, 1, 1)
    out = method(Batch([view_a, view_b], torch.tensor([2, 1])))

    def nll(logits: list[float], label: int) -> float:
        return -logits[label] + math.log(sum(math.exp(z) for z in logits))

    # view a: logits (1, 0, 1) label 2, (0, 2, 2) label 1; view b: (0, 0, 0) 2, (1, 1, 2) 1.
    expected = [nll([1, 0, 1], 2), nll([0, 2, 2], 1), nll([0, 0, 0], 2), nll([1, 1, 2], 1)]
    assert out.loss.item() == pytest.approx(sum(expected) / 4, rel=1e-6)
    # Top-1: (1, 0, 1) ties -> class 0 (wrong), (0, 2, 2) ties -> 1 (right), (0, 0, 0) -> 0,
    # (1, 1, 2) -> 2: one of four.
    assert out.logs["pretext_accuracy"].item() == pytest.approx(0.25)
    assert set(out.logs) == {"loss", "pretext_accuracy"}


def test_default_model_on_rgb_patches_trains_the_backbone():
    torch.manual_seed(0)
    backbone, dim = build_backbone("small_cnn", width=0.25, in_channels=3)
    method = ExemplarCNN(backbone, dim, 10)  # 512-unit layer with dropout before the softmax
    make = ExemplarCNN.requirements(_options()).pretext
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    columns = make([images, images], torch.Generator().manual_seed(0))
    views = [columns[f"view_{k}"].float() / 255 for k in range(2)]
    out = method(Batch(views, torch.tensor([0, 3, 9, 2, 5, 7])))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert all(not value.requires_grad for value in out.logs.values())
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in backbone.parameters())
    assert method.features(views[0]).shape == (6, dim)


def test_options_are_validated_and_indices_required():
    backbone, dim = build_backbone("small_cnn", width=0.25, in_channels=1)
    with pytest.raises(ValueError, match="indices"):
        ExemplarCNN(backbone, dim, 8)(Batch([torch.randn(2, 1, 28, 28)] * 2))
    for bad in ({"scale_min": 2.0}, {"pca_factor": 0.5}, {"padding": "wrap"}, {"dropout": 1.0}):
        with pytest.raises(
            ValueError, match=next(iter(bad)) if "scale" not in str(bad) else "scale"
        ):
            validate_options(ExemplarCNN, **bad)
    with pytest.raises(ValueError, match="num_images"):
        ExemplarCNN(backbone, dim, 1)


def test_surrogate_class_accuracy_rises_on_fashion_mnist_seeds(fmnist_small):
    """64 seeds = 64 classes under the paper's full transformation family, fresh every step.
    A linear classifier (hidden_dim=0) on the tiny CNN gives the clearest signal in 40 steps."""
    from pipeline.data.ingest import ImageSpec, read_decoded

    seeds = torch.from_numpy(read_decoded(fmnist_small["train"], ImageSpec(28, 1), 64).pixels)
    mean, std = seeds.float().mean() / 255, seeds.float().std() / 255
    indices = torch.arange(64)
    torch.manual_seed(0)
    backbone, dim = build_backbone("small_cnn", width=0.25, in_channels=1)
    method = ExemplarCNN(backbone, dim, 64, hidden_dim=0)
    make = ExemplarCNN.requirements(_options()).pretext
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(method.parameters(), lr=1e-2)
    accuracies = []
    for step in range(40):
        columns = make(
            [seeds] * ExemplarCNN.requirements(ExemplarCNN.option_defaults()).global_views,
            generator,
        )
        views = [(columns[f"view_{k}"].float() / 255 - mean) / std for k in range(2)]
        out = method(Batch(views, indices))
        optimizer.zero_grad()
        out.loss.backward()
        if step == 0:
            grads = [p.grad for p in method.backbone.parameters()]
            assert all(g is not None and torch.isfinite(g).all() for g in grads)
            assert any(g.abs().sum() > 0 for g in grads)
        optimizer.step()
        accuracies.append(out.logs["pretext_accuracy"].item())
    # Chance is 1/64 = 0.016; the patches are new transformations at every step (the
    # last five steps' mean was 0.14-0.18 over four seeds).
    assert sum(accuracies[:3]) / 3 < 0.05
    assert sum(accuracies[-5:]) / 5 > 0.08
