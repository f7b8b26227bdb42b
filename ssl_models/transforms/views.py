"""Batched SimCLR view generation on uint8 image tensors, on CPU or the training device.

The SimCLR recipe (Chen et al. 2020, arXiv:2002.05709, appendix A): random resized crop,
horizontal flip, colour jitter (brightness, contrast, saturation, hue in random order) with
probability 0.8, random grayscale with probability 0.2, and Gaussian blur. Colour strength
``s`` scales the jitter to (0.8s, 0.8s, 0.8s, 0.2s). Single-channel images get brightness
and contrast only, since saturation, hue and grayscale are meaningless for them.

Every random parameter is drawn per sample (on the CPU, from one generator, so a seed gives
the same views on any device), but each operation runs once over a batch: crop and flip are
one ``affine_grid``/``grid_sample`` call, jitter a few broadcast passes
(``ssl_models.transforms.color``), blur one grouped convolution per axis. On CPU the batch is
processed in chunks small enough to stay in cache, which matters more than anything else
for large images.

Solarization (BYOL, Grill et al. 2020, arXiv:2006.07733, appendix B: the last step, after
blur) inverts every pixel at or above 128 of a drawn sample, on the uint8 view:
``torchvision.transforms.functional.solarize(view, 128)`` exactly. Asymmetric recipes (BYOL's
two views differ in blur and solarization) are one recipe per view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_models.transforms.color import (
    JitterParams,
    apply_jitter,
    grayscale,
    sample_jitter,
    uniform,
)


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
    solarize_prob: float = 0.0

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
        solarize_prob: float = 0.0,
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
            solarize_prob=solarize_prob,
        )


def sample_crop_boxes(
    n: int, height: int, width: int, recipe: ViewRecipe, gen: torch.Generator, tries: int = 10
) -> Tensor:
    """Per-sample crop boxes (x0, y0, w, h) in pixels, as torchvision's RandomResizedCrop.

    Draw ``tries`` candidate (area, log-ratio) pairs per sample and keep the first that fits
    inside the image; samples where none fits fall back to the largest central crop whose
    aspect ratio lies in the allowed range.
    """
    area = height * width
    scale = uniform(n * tries, *recipe.crop_scale, gen).view(n, tries) * area
    log_lo, log_hi = math.log(recipe.crop_ratio[0]), math.log(recipe.crop_ratio[1])
    ratio = torch.exp(uniform(n * tries, log_lo, log_hi, gen)).view(n, tries)
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
    theta = torch.zeros(n, 2, 3, device=images.device)
    theta[:, 0, 0] = (w / width) * torch.where(flip, -1.0, 1.0)
    theta[:, 0, 2] = (2 * x0 + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * y0 + h) / height - 1
    grid = F.affine_grid(theta, [n, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def gaussian_blur(images: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur with a per-sample sigma, kernel about 10% of the image side."""
    n, channels, height, _ = images.shape
    radius = max(1, int(0.1 * height) // 2)
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(offsets.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)
    # Tail weights of a narrow kernel underflow to denormals, which make the convolution
    # several times slower on CPUs; they are far below a uint8 step, so drop them.
    kernel = torch.where(kernel < 1e-12, 0.0, kernel).repeat_interleave(channels, 0)
    flat = images.reshape(1, n * channels, height, -1)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel.view(n * channels, 1, 1, -1), groups=n * channels)
    flat = F.conv2d(flat, kernel.view(n * channels, 1, -1, 1), groups=n * channels)
    return flat.view_as(images)


@dataclass(frozen=True)
class ViewParams:
    """Every random draw for one view of each image in a batch (CPU tensors)."""

    boxes: Tensor  # (N, 4) crop boxes x0, y0, w, h in source pixels
    flip: Tensor  # (N,) mirror or not
    jitter: JitterParams
    gray: Tensor  # (N,) convert to grayscale or not
    blur_sigma: Tensor  # (N,) Gaussian sigma, 0 for no blur
    solarize: Tensor  # (N,) solarize or not

    def rows(self, start: int, stop: int) -> ViewParams:
        """The draws of images ``start:stop``."""
        return ViewParams(
            self.boxes[start:stop],
            self.flip[start:stop],
            self.jitter.rows(start, stop),
            self.gray[start:stop],
            self.blur_sigma[start:stop],
            self.solarize[start:stop],
        )


def sample_view_params(
    n: int, channels: int, height: int, width: int, recipe: ViewRecipe, gen: torch.Generator
) -> ViewParams:
    """Draw one view's parameters for each of ``n`` images of the given shape."""
    boxes = sample_crop_boxes(n, height, width, recipe, gen)
    flip = torch.rand(n, generator=gen) < recipe.flip_prob
    jitter = sample_jitter(n, channels, recipe, gen)
    gray = (torch.rand(n, generator=gen) < recipe.grayscale_prob) & (channels == 3)
    blur = torch.rand(n, generator=gen) < recipe.blur_prob
    sigma = torch.where(blur, uniform(n, *recipe.blur_sigma, gen), 0.0)
    # Drawn only when asked for, so recipes without it keep their random streams.
    solarize = (
        torch.rand(n, generator=gen) < recipe.solarize_prob
        if recipe.solarize_prob > 0
        else torch.zeros(n, dtype=torch.bool)
    )
    return ViewParams(boxes, flip, jitter, gray, sigma, solarize)


def apply_view(images: Tensor, params: ViewParams, size: int) -> Tensor:
    """Make uint8 (N, C, H, W) images into uint8 (N, C, size, size) views of ``params``."""
    device = images.device
    x = images.float().div_(255)
    x = resized_crop_flip(x, params.boxes.to(device), params.flip.to(device), size)
    x = apply_jitter(x, params.jitter)
    gray = params.gray.to(device)
    if bool(gray.any()):
        x = torch.where(gray.view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
    blurred = params.blur_sigma.nonzero().view(-1)
    if len(blurred):
        sigma = params.blur_sigma[blurred].to(device)
        x[blurred.to(device)] = gaussian_blur(x[blurred.to(device)], sigma)
    views = x.mul_(255).round_().clamp_(0, 255).to(torch.uint8)
    return solarize(views, params.solarize.to(device))


#: BYOL's asymmetric pair (Grill et al. 2020, table 6): view 1 always blurred, never
#: solarized; view 2 blurred with p=0.1, solarized with p=0.2. Barlow Twins, VICReg and
#: MoCo v3 use it as well. The rest of each view is the augment section's: one colour
#: strength s scales brightness, contrast and saturation alike (0.8s) and hue (0.2s), so at
#: s=0.5 saturation jitters by 0.4 where BYOL's recipe has 0.2 (SimCLR's scaling).
BYOL_VIEWS: tuple[dict[str, float], ...] = (
    {"blur_prob": 1.0, "solarize_prob": 0.0},
    {"blur_prob": 0.1, "solarize_prob": 0.2},
)
#: DINO's global pair as BYOL's, and its local crops blurred with p=0.5 (Caron et al. 2021,
#: official ``DataAugmentationDINO``).
DINO_VIEWS: tuple[dict[str, float], ...] = (
    *BYOL_VIEWS,
    {"blur_prob": 0.5, "solarize_prob": 0.0},
)

SOLARIZE_THRESHOLD = 128  # BYOL's 0.5 of the [0, 1] range; torchvision's RandomSolarize(128)


def solarize(views: Tensor, chosen: Tensor) -> Tensor:
    """Invert (255 - v) the pixels >= 128 of the chosen uint8 views (N, C, H, W)."""
    if not bool(chosen.any()):
        return views
    inverted = torch.where(views >= SOLARIZE_THRESHOLD, 255 - views, views)
    return torch.where(chosen.view(-1, 1, 1, 1), inverted, views)


# Float elements per CPU chunk (4 MiB): a chunk's passes then run out of cache, not memory.
_CPU_CHUNK_ELEMENTS = 1 << 20


def random_views(images: Tensor, recipe: ViewRecipe, gen: torch.Generator) -> Tensor:
    """One random view of each uint8 image in (N, C, H, W); returns uint8 (N, C, size, size).

    Works on the images' device; ``gen`` is a CPU generator that draws all parameters.
    """
    n, channels, height, width = images.shape
    params = sample_view_params(n, channels, height, width, recipe, gen)
    pixels = channels * max(height * width, recipe.size**2)
    chunk = n if images.device.type != "cpu" else max(1, _CPU_CHUNK_ELEMENTS // pixels)
    views = torch.empty(
        n, channels, recipe.size, recipe.size, dtype=torch.uint8, device=images.device
    )
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        views[start:stop] = apply_view(images[start:stop], params.rows(start, stop), recipe.size)
    return views
