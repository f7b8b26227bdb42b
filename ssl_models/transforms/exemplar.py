"""Exemplar CNN's data stage (Dosovitskiy et al. 2014, arXiv:1406.6909, Section 2): every
view of a seed image becomes a patch under its own random composition of the paper's
elementary transformations: translation, scaling and rotation of the patch; contrast 1
(each pixel's projection on the principal components of all pixels, scaled); contrast 2 (S
and V of HSV raised to a power, scaled and shifted); colour (a hue shift).

The principal components are those of the batch's pixels (the data stage sees a batch, not
the dataset). The paper gives ranges, not distributions: multiplicative parameters (scale,
factors, powers) are drawn log-uniformly, additive ones uniformly. Geometric transformations
act on the view, so the uncovered border is filled by ``padding`` (the paper transformed
inside the whole image).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def affine_patches(
    images: Tensor, angle: Tensor, scale: Tensor, shift: Tensor, padding: str = "reflection"
) -> Tensor:
    """Float images (N, C, H, W) resampled so output point p shows input point
    ``scale * R(angle) p + 2 shift`` (normalised coordinates: H and W span [-1, 1], y down).
    The patch window grows by ``scale`` (N,), turns ``angle`` (N,) degrees clockwise on
    screen and moves by ``shift`` (N, 2) (x, y) sides; so the content shrinks by ``scale``,
    turns counter-clockwise and moves by ``-shift``."""
    rad = torch.deg2rad(angle)
    cos, sin = torch.cos(rad) * scale, torch.sin(rad) * scale
    theta = torch.stack([cos, -sin, 2 * shift[:, 0], sin, cos, 2 * shift[:, 1]], 1).view(-1, 2, 3)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode=padding, align_corners=False)


def pixel_components(images: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (C,) and principal components (C, C), one per column, of all pixels of (N, C, H, W)."""
    pixels = images.transpose(0, 1).flatten(1)  # (C, N * H * W)
    mean = pixels.mean(1)
    centred = pixels - mean[:, None]
    return mean, torch.linalg.eigh(centred @ centred.T / pixels.shape[1]).eigenvectors


def pca_contrast(images: Tensor, factors: Tensor, mean: Tensor, components: Tensor) -> Tensor:
    """Contrast 1: each pixel's projection on component j times ``factors[:, j]`` (N, C)."""
    coords = torch.einsum("nchw,ck->nkhw", images - mean.view(1, -1, 1, 1), components)
    coords = coords * factors[:, :, None, None]
    return torch.einsum("nkhw,ck->nchw", coords, components) + mean.view(1, -1, 1, 1)


def rgb_to_hsv(images: Tensor) -> Tensor:
    """(N, 3, H, W) RGB in [0, 1] -> HSV with hue in turns [0, 1)."""
    r, g, b = images.unbind(1)
    value, low = images.amax(1), images.amin(1)
    chroma = value - low
    safe = chroma.clamp(min=1e-12)
    hue = torch.where(
        value == r, (g - b) / safe, torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4)
    )
    hue = torch.where(chroma > 0, torch.remainder(hue / 6, 1.0), torch.zeros_like(hue))
    saturation = torch.where(value > 0, chroma / value.clamp(min=1e-12), torch.zeros_like(value))
    return torch.stack([hue, saturation, value], 1)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_hsv`: channel k = V - V S clamp(min(t, 4 - t), 0, 1),
    t = (k + 6 H) mod 6 with k = 5, 3, 1 for R, G, B."""
    hue, saturation, value = hsv.unbind(1)
    channels = []
    for k in (5.0, 3.0, 1.0):
        t = torch.remainder(k + 6 * hue, 6)
        channels.append(value - value * saturation * torch.minimum(t, 4 - t).clamp(0, 1))
    return torch.stack(channels, 1)


def hsv_jitter(
    images: Tensor, power: Tensor, factor: Tensor, offset: Tensor, hue: Tensor
) -> Tensor:
    """Contrast 2 and colour: S and V (columns 0 and 1 of the (N, 2) parameters) become
    ``factor * x ** power + offset``, and ``hue`` (N,) turns are added to H. One channel:
    the intensity is V (column 1) and there is no hue."""
    hsv = rgb_to_hsv(images) if images.shape[1] == 3 else images
    sv = hsv[:, 1:] if images.shape[1] == 3 else images  # (S, V), or V alone
    p, f, o = (t[:, -sv.shape[1] :, None, None] for t in (power, factor, offset))
    sv = (f * sv**p + o).clamp(0, 1)
    if images.shape[1] == 1:
        return sv
    h = torch.remainder(hsv[:, :1] + hue.view(-1, 1, 1, 1), 1.0)
    return hsv_to_rgb(torch.cat([h, sv], 1))


@dataclass(frozen=True)
class ExemplarTransforms:
    """The data stage: every view becomes a patch under its own random transformation."""

    translation: float
    scale_min: float
    scale_max: float
    rotation: float
    pca_factor: float
    hsv_power: float
    hsv_factor_min: float
    hsv_factor_max: float
    hsv_offset: float
    hue_shift: float
    padding: str

    def __call__(self, views: list[Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        """Transform each view's patches; returns the keys above."""
        x = torch.cat(views).float() / 255
        n, channels = x.shape[:2]
        if channels not in (1, 3):
            raise ValueError(f"Exemplar CNN takes 1- or 3-channel images, got {channels}")

        def uniform(low: float, high: float, *shape: int) -> Tensor:
            draw = torch.rand(n, *shape, generator=generator) * (high - low) + low
            return draw.to(x.device)

        def log_uniform(low: float, high: float, *shape: int) -> Tensor:
            return uniform(math.log(low), math.log(high), *shape).exp()

        mean, components = pixel_components(x)  # before any view is transformed
        x = affine_patches(
            x,
            uniform(-self.rotation, self.rotation),
            log_uniform(self.scale_min, self.scale_max),
            uniform(-self.translation, self.translation, 2),
            self.padding,
        )
        x = pca_contrast(
            x, log_uniform(1 / self.pca_factor, self.pca_factor, channels), mean, components
        )
        x = hsv_jitter(
            x.clamp(0, 1),
            log_uniform(1 / self.hsv_power, self.hsv_power, 2),
            log_uniform(self.hsv_factor_min, self.hsv_factor_max, 2),
            uniform(-self.hsv_offset, self.hsv_offset, 2),
            uniform(-self.hue_shift, self.hue_shift),
        )
        patches = (x * 255).round().to(torch.uint8).chunk(len(views))
        return {f"view_{k}": patch for k, patch in enumerate(patches)}
