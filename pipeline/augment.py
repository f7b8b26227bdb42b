"""Batched SimCLR view generation on uint8 image tensors.

The SimCLR recipe (Chen et al. 2020, arXiv:2002.05709, appendix A): random resized crop,
horizontal flip, colour jitter (brightness, contrast, saturation, hue in random order) with
probability 0.8, random grayscale with probability 0.2, and Gaussian blur. Colour strength
``s`` scales the jitter to (0.8s, 0.8s, 0.8s, 0.2s). Single-channel images get brightness
and contrast only, since saturation, hue and grayscale are meaningless for them.

Every random parameter is drawn per sample, but each operation runs once over the whole
batch: crop and flip are one ``affine_grid``/``grid_sample`` call, jitter is a few
broadcast multiplies. That avoids the per-image Python loop of the usual PIL pipeline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# ITU-R 601-2 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class ViewRecipe:
    """Parameters of one random view; see pipeline.config.AugmentConfig for the knobs."""

    size: int
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    @classmethod
    def simclr(
        cls,
        size: int,
        strength: float = 0.5,
        crop_scale_min: float = 0.2,
        crop_ratio_max: float = 4 / 3,
        flip_prob: float = 0.5,
        jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_prob: float = 0.0,
    ) -> ViewRecipe:
        """The paper's recipe with colour-distortion strength ``strength`` (s)."""
        return cls(
            size=size,
            crop_scale=(crop_scale_min, 1.0),
            crop_ratio=(1 / crop_ratio_max, crop_ratio_max),
            flip_prob=flip_prob,
            jitter_prob=jitter_prob,
            brightness=0.8 * strength,
            contrast=0.8 * strength,
            saturation=0.8 * strength,
            hue=min(0.2 * strength, 0.5),
            grayscale_prob=grayscale_prob,
            blur_prob=blur_prob,
        )


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> Tensor:
    return torch.rand(n, generator=gen) * (high - low) + low


def sample_crop_boxes(
    n: int, height: int, width: int, recipe: ViewRecipe, gen: torch.Generator, tries: int = 10
) -> Tensor:
    """Per-sample crop boxes (x0, y0, w, h) in pixels, as torchvision's RandomResizedCrop.

    Draw ``tries`` candidate (area, log-ratio) pairs per sample and keep the first that fits
    inside the image; samples where none fits fall back to the largest central crop whose
    aspect ratio lies in the allowed range.
    """
    area = height * width
    scale = _uniform(n * tries, *recipe.crop_scale, gen).view(n, tries) * area
    log_lo, log_hi = math.log(recipe.crop_ratio[0]), math.log(recipe.crop_ratio[1])
    ratio = torch.exp(_uniform(n * tries, log_lo, log_hi, gen)).view(n, tries)
    w = torch.sqrt(scale * ratio).round()
    h = torch.sqrt(scale / ratio).round()
    fits = (w >= 1) & (h >= 1) & (w <= width) & (h <= height)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((n,), -1))

    in_ratio = min(max(width / height, recipe.crop_ratio[0]), recipe.crop_ratio[1])
    fallback_w = float(width if width / height <= in_ratio else round(height * in_ratio))
    fallback_w = min(fallback_w, width)
    fallback_h = float(min(height, round(fallback_w / in_ratio)))
    rows = torch.arange(n)
    cw = torch.where(first >= 0, w[rows, first.clamp(min=0)], torch.tensor(fallback_w))
    ch = torch.where(first >= 0, h[rows, first.clamp(min=0)], torch.tensor(fallback_h))
    x0 = torch.where(
        first >= 0, (torch.rand(n, generator=gen) * (width - cw + 1)).floor(), (width - cw) / 2
    )
    y0 = torch.where(
        first >= 0, (torch.rand(n, generator=gen) * (height - ch + 1)).floor(), (height - ch) / 2
    )
    return torch.stack([x0, y0, cw, ch], dim=1)


def resized_crop_flip(images: Tensor, boxes: Tensor, flip: Tensor, size: int) -> Tensor:
    """Crop each float image to its box, resize to ``size`` and mirror where ``flip``."""
    n, _, height, width = images.shape
    x0, y0, w, h = boxes.unbind(1)
    # Map output coordinates in [-1, 1] onto the box, in align_corners=False convention.
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = (w / width) * torch.where(flip, -1.0, 1.0)
    theta[:, 0, 2] = (2 * x0 + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * y0 + h) / height - 1
    grid = F.affine_grid(theta, [n, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _grayscale(images: Tensor) -> Tensor:
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _blend(images: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    return (factor * images + (1 - factor) * other).clamp(0, 1)


def _adjust_hue(images: Tensor, shift: Tensor) -> Tensor:
    """Rotate hue by ``shift`` (fraction of a turn) through HSV, per sample."""
    r, g, b = images.unbind(1)
    maxc, _ = images.max(1)
    minc, _ = images.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(
        maxc == r,
        ((g - b) / safe) % 6,
        torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4),
    )
    hue = torch.where(delta > 0, hue / 6, torch.zeros_like(hue))
    hue = (hue + shift.view(-1, 1, 1)) % 1.0
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), 0.0)
    # HSV -> RGB: channel k takes v - v*s*clamp(min(t, 4 - t), 0, 1) with t = (k + 6h) mod 6.
    out = []
    for k in (5.0, 3.0, 1.0):
        t = (k + hue * 6) % 6
        out.append(maxc - maxc * sat * torch.clamp(torch.minimum(t, 4 - t), 0, 1))
    return torch.stack(out, 1)


def color_jitter(images: Tensor, recipe: ViewRecipe, gen: torch.Generator) -> Tensor:
    """Apply jitter with probability ``jitter_prob``; the four ops run in a per-sample order."""
    n, channels = images.shape[:2]
    ops = ["brightness", "contrast"] + (["saturation", "hue"] if channels == 3 else [])
    apply = torch.rand(n, generator=gen) < recipe.jitter_prob
    factors = {
        name: _uniform(n, max(0.0, 1 - getattr(recipe, name)), 1 + getattr(recipe, name), gen)
        for name in ops[:3]
    }
    if "hue" in ops:
        factors["hue"] = _uniform(n, -recipe.hue, recipe.hue, gen)
    order = torch.argsort(torch.rand(n, len(ops), generator=gen), dim=1)
    for position in range(len(ops)):
        for op_index, name in enumerate(ops):
            chosen = apply & (order[:, position] == op_index)
            if not chosen.any():
                continue
            x, f = images[chosen], factors[name][chosen].view(-1, 1, 1, 1)
            if name == "brightness":
                x = (x * f).clamp(0, 1)
            elif name == "contrast":
                x = _blend(x, _grayscale(x).mean(dim=(1, 2, 3), keepdim=True), f)
            elif name == "saturation":
                x = _blend(x, _grayscale(x), f)
            else:
                x = _adjust_hue(x, f.view(-1))
            images[chosen] = x
    return images


def gaussian_blur(images: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur with a per-sample sigma, kernel about 10% of the image side."""
    n, channels, height, _ = images.shape
    radius = max(1, int(0.1 * height) // 2)
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-(offsets.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(channels, 0)
    flat = images.reshape(1, n * channels, height, -1)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel.view(n * channels, 1, 1, -1), groups=n * channels)
    flat = F.conv2d(flat, kernel.view(n * channels, 1, -1, 1), groups=n * channels)
    return flat.view_as(images)


def random_views(images: Tensor, recipe: ViewRecipe, gen: torch.Generator) -> Tensor:
    """One random view of each uint8 image in (N, C, H, W); returns uint8 (N, C, size, size)."""
    n, _, height, width = images.shape
    x = images.float().div_(255)
    boxes = sample_crop_boxes(n, height, width, recipe, gen)
    flip = torch.rand(n, generator=gen) < recipe.flip_prob
    x = resized_crop_flip(x, boxes, flip, recipe.size)
    x = color_jitter(x, recipe, gen)
    if x.shape[1] == 3 and recipe.grayscale_prob > 0:
        gray = torch.rand(n, generator=gen) < recipe.grayscale_prob
        x = torch.where(gray.view(-1, 1, 1, 1), _grayscale(x).expand_as(x), x)
    if recipe.blur_prob > 0:
        blur = torch.rand(n, generator=gen) < recipe.blur_prob
        if blur.any():
            sigma = _uniform(int(blur.sum()), *recipe.blur_sigma, gen)
            x[blur] = gaussian_blur(x[blur], sigma)
    return x.mul_(255).round_().clamp_(0, 255).to(torch.uint8)
