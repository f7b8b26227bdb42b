"""Batched SimCLR views: shapes, parameter ranges and per-op correctness."""

import math
from dataclasses import replace

import pytest
import torch
from torchvision.transforms import RandomResizedCrop, v2

from ssl_models.transforms.color import color_jitter
from ssl_models.transforms.views import (
    ViewRecipe,
    gaussian_blur,
    random_views,
    resized_crop_flip,
    sample_crop_boxes,
    sample_view_params,
    solarize,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_views_have_the_requested_shape_and_dtype():
    images = torch.randint(0, 256, (16, 3, 40, 30), dtype=torch.uint8)
    views = random_views(images, ViewRecipe.simclr(24, blur_prob=0.5), _gen())
    assert views.shape == (16, 3, 24, 24) and views.dtype == torch.uint8
    gray = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    assert random_views(gray, ViewRecipe.simclr(28), _gen()).shape == (8, 1, 28, 28)


def test_crop_boxes_fit_and_follow_scale_and_ratio_ranges():
    recipe = ViewRecipe(size=32, crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3))
    boxes = sample_crop_boxes(20000, 64, 48, recipe, _gen())
    x0, y0, w, h = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all()
    assert (x0 + w <= 48).all() and (y0 + h <= 64).all()
    area = w * h / (64 * 48)
    # Rounding to whole pixels moves the limits by a little.
    assert area.min() >= 0.18 and area.max() <= 1.0
    ratio = w / h
    assert ratio.min() >= 0.7 and ratio.max() <= 1.45
    # Same distribution as torchvision's RandomResizedCrop (large boxes of extreme aspect
    # ratio do not fit and are redrawn there too, which pulls the mean area below 0.6).
    reference = torch.tensor(
        [
            RandomResizedCrop.get_params(torch.zeros(1, 64, 48), [0.2, 1.0], [3 / 4, 4 / 3])
            for _ in range(5000)
        ],
        dtype=torch.float,
    )
    ref_area = reference[:, 2] * reference[:, 3] / (64 * 48)
    ref_ratio = reference[:, 3] / reference[:, 2]
    assert abs(area.mean() - ref_area.mean()) < 0.015
    assert abs(area.std() - ref_area.std()) < 0.015
    assert abs(ratio.mean() - ref_ratio.mean()) < 0.015


def test_full_box_without_flip_is_the_identity_and_flip_mirrors():
    images = torch.rand(4, 3, 16, 16)
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0]]).repeat(4, 1)
    same = resized_crop_flip(images, boxes, torch.zeros(4, dtype=torch.bool), 16)
    torch.testing.assert_close(same, images, atol=1e-5, rtol=0)
    mirrored = resized_crop_flip(images, boxes, torch.ones(4, dtype=torch.bool), 16)
    torch.testing.assert_close(mirrored, images.flip(-1), atol=1e-5, rtol=0)


def test_crop_takes_the_box_region():
    images = torch.zeros(1, 1, 8, 8)
    images[..., 4:, 4:] = 1.0  # bottom-right quadrant
    box = torch.tensor([[4.0, 4.0, 4.0, 4.0]])
    out = resized_crop_flip(images, box, torch.zeros(1, dtype=torch.bool), 4)
    torch.testing.assert_close(out, torch.ones(1, 1, 4, 4))


def test_flip_rate_matches_probability():
    images = torch.zeros(4000, 1, 8, 8, dtype=torch.uint8)
    images[..., :4] = 255  # left half bright
    recipe = ViewRecipe(size=8, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_prob=0)
    views = random_views(images, recipe, _gen())
    flipped = (views[:, 0, 4, 0] == 0).float().mean().item()
    assert abs(flipped - 0.5) < 0.03


def test_brightness_and_contrast_stay_in_range_and_single_channel_keeps_one_channel():
    images = torch.rand(512, 1, 6, 6)
    recipe = ViewRecipe(size=6, jitter_prob=1.0, brightness=0.8, contrast=0.8)
    out = color_jitter(images.clone(), recipe, _gen())
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    # Brightness and contrast both change the image for almost every sample.
    changed = (out - images).abs().flatten(1).amax(1) > 1e-3
    assert changed.float().mean() > 0.95


def test_jitter_probability_is_respected():
    images = torch.rand(4000, 3, 4, 4)
    recipe = ViewRecipe(size=4, jitter_prob=0.8)
    out = color_jitter(images.clone(), recipe, _gen())
    untouched = ((out - images).abs().flatten(1).amax(1) == 0).float().mean().item()
    assert abs(untouched - 0.2) < 0.03


def test_grayscale_rate_and_result():
    images = torch.randint(0, 256, (4000, 3, 4, 4), dtype=torch.uint8)
    recipe = ViewRecipe(
        size=4, crop_scale=(1, 1), crop_ratio=(1, 1), flip_prob=0, jitter_prob=0, grayscale_prob=0.2
    )
    views = random_views(images, recipe, _gen())
    gray = (views[:, 0] == views[:, 1]).all(-1).all(-1) & (views[:, 1] == views[:, 2]).all(-1).all(
        -1
    )
    assert abs(gray.float().mean().item() - 0.2) < 0.03


@pytest.mark.parametrize("sigma", [0.5, 1.5])
def test_blur_keeps_constant_images_and_matches_gaussian_weights(sigma):
    flat = torch.full((2, 3, 20, 20), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, torch.tensor([sigma, sigma])), flat)
    impulse = torch.zeros(1, 1, 21, 21)
    impulse[..., 10, 10] = 1.0
    out = gaussian_blur(impulse, torch.tensor([sigma]))
    weight = lambda d: math.exp(-(d**2) / (2 * sigma**2))  # noqa: E731
    expected_ratio = weight(1) / weight(0)
    assert out[0, 0, 10, 11].item() / out[0, 0, 10, 10].item() == pytest.approx(
        expected_ratio, rel=1e-4
    )
    assert out.sum().item() == pytest.approx(1.0, rel=1e-5)


def test_two_draws_differ_and_seeded_draws_repeat():
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    recipe = ViewRecipe.simclr(28)
    a, b = random_views(images, recipe, _gen(1)), random_views(images, recipe, _gen(2))
    assert not torch.equal(a, b)
    assert torch.equal(a, random_views(images, recipe, _gen(1)))


def _ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    values = torch.cat([a, b]).sort().values
    cdf_a = torch.searchsorted(a.sort().values, values, right=True) / len(a)
    cdf_b = torch.searchsorted(b.sort().values, values, right=True) / len(b)
    return (cdf_a - cdf_b).abs().max().item()


def _colour_wheel(size: int) -> torch.Tensor:
    """A uint8 test image with every hue along x and falling brightness along y."""
    hue = torch.linspace(0, 1, size).view(1, size)
    value = torch.linspace(1, 0.3, size).view(size, 1)
    channels = []
    for k in (5, 3, 1):
        t = (k + 6 * hue) % 6
        channels.append(value - value * torch.clamp(torch.minimum(t, 4 - t), 0, 1))
    return (torch.stack(channels) * 255).round().to(torch.uint8)


def test_views_match_the_per_image_torchvision_recipe_in_distribution():
    """Same image, 3,000 views each way: per-view channel means and contrast agree (KS)."""
    recipe = ViewRecipe.simclr(24, strength=1.0, blur_prob=0.5)
    image = _colour_wheel(32)
    ours = random_views(image.expand(3000, -1, -1, -1), recipe, _gen()).float() / 255
    torch.manual_seed(0)
    reference_recipe = v2.Compose(
        [
            v2.RandomResizedCrop(24, scale=recipe.crop_scale, ratio=recipe.crop_ratio),
            v2.RandomHorizontalFlip(recipe.flip_prob),
            v2.RandomApply(
                [v2.ColorJitter(recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue)],
                p=recipe.jitter_prob,
            ),
            v2.RandomGrayscale(recipe.grayscale_prob),
            v2.RandomApply([v2.GaussianBlur(5, recipe.blur_sigma)], p=recipe.blur_prob),
        ]
    )
    reference = torch.stack([reference_recipe(image.float() / 255) for _ in range(3000)])
    threshold = 1.95 * (2 / 3000) ** 0.5  # two-sample KS at alpha = 0.001
    for statistic in (
        lambda v: v.mean(dim=(2, 3)),  # brightness and colour balance, per channel
        lambda v: v.std(dim=(2, 3)),  # contrast and crop extent
        lambda v: (v.amax(1) - v.amin(1)).mean(dim=(1, 2)).unsqueeze(1),  # chroma
    ):
        for ours_column, reference_column in zip(
            statistic(ours).T, statistic(reference).T, strict=True
        ):
            assert _ks_distance(ours_column, reference_column) < threshold


def test_every_sample_in_a_batch_gets_its_own_parameters():
    recipe = ViewRecipe.simclr(24, blur_prob=0.5)
    params = sample_view_params(512, 3, 224, 224, recipe, _gen())
    assert len(params.boxes.unique(dim=0)) > 505  # whole-pixel boxes: a few coincide
    jittered = (params.jitter.factors != torch.tensor([1.0, 1.0, 1.0, 0.0])).any(1)
    # Every jittered sample has its own factors; the rest share the identity.
    assert len(params.jitter.factors.unique(dim=0)) == int(jittered.sum()) + 1
    views = random_views(_colour_wheel(32).expand(512, -1, -1, -1), recipe, _gen())
    assert len(views.flatten(1).unique(dim=0)) == 512


def test_blur_rate_and_sigma_range():
    recipe = ViewRecipe(size=8, blur_prob=0.5, blur_sigma=(0.1, 2.0))
    sigma = sample_view_params(20000, 3, 8, 8, recipe, _gen()).blur_sigma
    blurred = sigma[sigma > 0]
    assert abs(len(blurred) / 20000 - 0.5) < 0.015
    assert blurred.min() >= 0.1 and blurred.max() <= 2.0
    assert abs(blurred.mean().item() - 1.05) < 0.02


def test_chunked_cpu_views_equal_one_pass_views(monkeypatch):
    images = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8)
    recipe = ViewRecipe.simclr(12, blur_prob=0.5)
    whole = random_views(images, recipe, _gen(3))
    monkeypatch.setattr("ssl_models.transforms.views._CPU_CHUNK_ELEMENTS", 3 * 16 * 16 * 3)
    torch.testing.assert_close(random_views(images, recipe, _gen(3)), whole, atol=1, rtol=0)


def test_solarization_equals_torchvisions_solarize_on_the_chosen_views_only():
    from torchvision.transforms.functional import solarize as torchvision_solarize

    views = torch.randint(0, 256, (6, 3, 9, 9), dtype=torch.uint8)
    chosen = torch.tensor([True, False, True, True, False, False])
    out = solarize(views, chosen)
    for i in range(6):
        expected = torchvision_solarize(views[i], 128) if chosen[i] else views[i]
        assert torch.equal(out[i], expected)


def test_solarization_is_the_views_last_step_at_its_drawn_rate():
    recipe = ViewRecipe.simclr(8, blur_prob=0.3, solarize_prob=0.2)
    params = sample_view_params(20000, 3, 8, 8, recipe, _gen())
    assert abs(float(params.solarize.float().mean()) - 0.2) < 0.01
    # Drawn after everything else: the same seed gives the same crops, jitter and blur.
    plain = sample_view_params(20000, 3, 8, 8, replace(recipe, solarize_prob=0.0), _gen())
    assert torch.equal(plain.boxes, params.boxes) and torch.equal(
        plain.blur_sigma, params.blur_sigma
    )
    assert not plain.solarize.any()
    images = torch.randint(0, 256, (64, 3, 12, 12), dtype=torch.uint8)
    solarized = random_views(images, replace(recipe, solarize_prob=1.0), _gen(5))
    unsolarized = random_views(images, replace(recipe, solarize_prob=0.0), _gen(5))
    assert torch.equal(solarized, solarize(unsolarized, torch.ones(64, dtype=torch.bool)))
