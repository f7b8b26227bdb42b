"""Batched colour jitter against torchvision, op by op and in distribution."""

import itertools

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from ssl_models.transforms.color import (
    JitterParams,
    adjust_hue,
    apply_jitter,
    grayscale,
    sample_jitter,
)
from ssl_models.transforms.views import ViewRecipe

TORCHVISION_OPS = {
    "brightness": TF.adjust_brightness,
    "contrast": TF.adjust_contrast,
    "saturation": TF.adjust_saturation,
    "hue": TF.adjust_hue,
}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_hue_matches_torchvision_including_grey_and_tied_pixels():
    images = torch.rand(6, 3, 5, 5)
    images[0, :, 0, 0] = 0.5  # grey
    images[1, :2, 1, 1] = 0.9  # red and green tie for the maximum
    shifts = torch.tensor([-0.4, -0.1, 0.0, 0.05, 0.2, 0.5])
    ours = adjust_hue(images, shifts)
    for i, shift in enumerate(shifts.tolist()):
        torch.testing.assert_close(ours[i], TF.adjust_hue(images[i], shift), atol=1e-5, rtol=0)


@pytest.mark.parametrize("channels", [1, 3])
def test_each_sample_gets_its_own_ops_in_its_own_order_exactly_as_torchvision(channels):
    recipe = ViewRecipe(size=6, jitter_prob=0.8, brightness=0.8, contrast=0.8, saturation=0.8)
    images = torch.rand(64, channels, 6, 6)
    params = sample_jitter(64, channels, recipe, _gen())
    ours = apply_jitter(images.clone(), params)
    for i in range(64):
        expected = images[i]
        for op in params.order[i].tolist():
            expected = TORCHVISION_OPS[params.ops[op]](expected, params.factors[i, op].item())
        torch.testing.assert_close(ours[i], expected, atol=1e-5, rtol=0)


def test_draws_follow_colorjitter_ranges_probability_and_uniform_order():
    n = 24000
    recipe = ViewRecipe(size=4, jitter_prob=0.8, brightness=0.4, contrast=0.8, hue=0.1)
    params = sample_jitter(n, 3, recipe, _gen())
    assert params.ops == ("brightness", "contrast", "saturation", "hue")
    identity = torch.tensor([1.0, 1.0, 1.0, 0.0])
    jittered = (params.factors != identity).any(1)
    assert abs(jittered.float().mean().item() - 0.8) < 0.01  # 4 sigma is 0.010
    ranges = {"brightness": (0.6, 1.4), "contrast": (0.2, 1.8), "saturation": (0.6, 1.4)}
    ranges["hue"] = (-0.1, 0.1)
    for column, name in enumerate(params.ops):
        low, high = ranges[name]
        drawn = params.factors[jittered, column]
        assert drawn.min() >= low and drawn.max() <= high
        # Kolmogorov-Smirnov distance to the uniform distribution on [low, high].
        cdf = (drawn.sort().values - low) / (high - low)
        steps = torch.arange(1, len(drawn) + 1) / len(drawn)
        assert (cdf - steps).abs().max() < 1.95 / len(drawn) ** 0.5  # alpha = 0.001
    # Every one of the 24 orders is equally likely (chi-square, 23 dof, p = 0.001 -> 49.7).
    counts = {order: 0 for order in itertools.permutations(range(4))}
    for order in params.order.tolist():
        counts[tuple(order)] += 1
    expected = n / 24
    assert sum((c - expected) ** 2 / expected for c in counts.values()) < 49.7


def test_zero_strength_is_the_identity_and_grayscale_uses_luma():
    images = torch.rand(8, 3, 5, 5)
    recipe = ViewRecipe(size=5, jitter_prob=1.0, brightness=0, contrast=0, saturation=0, hue=0)
    params = sample_jitter(8, 3, recipe, _gen())
    torch.testing.assert_close(apply_jitter(images.clone(), params), images)
    torch.testing.assert_close(grayscale(images), TF.rgb_to_grayscale(images))


def test_params_slice_by_rows():
    params = sample_jitter(10, 3, ViewRecipe(size=4), _gen())
    part = params.rows(2, 5)
    assert isinstance(part, JitterParams) and part.ops == params.ops
    assert torch.equal(part.factors, params.factors[2:5])
    assert torch.equal(part.order, params.order[2:5])
