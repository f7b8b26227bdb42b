"""Exemplar CNN (Dosovitskiy, Springenberg, Riedmiller and Brox 2014, "Discriminative
Unsupervised Feature Learning with Convolutional Neural Networks", NIPS 2014, arXiv:1406.6909;
TPAMI version arXiv:1406.6909v2), Section 2.

Every seed image is a surrogate class of its own; the class's samples are the seed under
random compositions of the paper's elementary transformations, drawn per patch:

    for x, i in loader:                 # i: dataset indices = surrogate class labels (N seeds)
        for k in 1..K:                  # the data stage: K transformed patches per seed
            p_k = T(x):  translation  up to 0.2 of the patch side, each axis
                         scaling      of the patch scale by a factor in [0.7, 1.4]
                         rotation     by up to 20 degrees
                         contrast 1   projection of each pixel on each principal component
                                      of all pixels times a factor in [0.5, 2]
                         contrast 2   S and V (HSV) to a power in [0.25, 4], times a factor
                                      in [0.7, 1.4], plus a value in [-0.1, 0.1]
                         colour       hue plus a value in [-0.1, 0.1]
        loss = mean over k of cross_entropy(classifier(f(p_k)), i)   # N-way softmax

Where this differs, and why:
- The paper draws K <= 300 transformations per seed once (a fixed surrogate set); here the
  data stage draws fresh ones every step (``num_views`` per seed), so each epoch brings new
  samples of every class; the paper found more samples per class better.
- Its seeds are 32 px patches taken where the gradient is large; here the seed is the image
  and the run's augmentation recipe gives the base crop. Use flips only
  (``augment.crop_scale_min=1``, ``jitter_prob=0``, ``grayscale_prob=0``): these colour
  transformations replace SimCLR's, and the translations and scalings below move the patch
  (random crops on top made the task harder and learned slower on Fashion-MNIST).
  Geometric transformations act on that crop, so the uncovered border is reflected (the
  paper transformed inside the whole image).
- A softmax over thousands of surrogate classes gives each class's weights a gradient only
  when one of its samples is in the batch: with few steps, train with AdamW (SGD kept
  2,000 classes at chance for 150 steps; ``benchmarks/RESULTS.md``).
- The principal components are those of the batch's pixels: the data stage sees a batch,
  not the dataset. The paper gives ranges, not distributions: multiplicative parameters
  (scale, factors, powers) are drawn log-uniformly, additive ones uniformly; S and V get
  their own power, factor and offset.
- 1-channel images are HSV with S = 0 and V = intensity: contrast 2 acts on the intensity,
  and there is no hue to shift; contrast 1 scales deviations from the mean intensity.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models.method import MethodOutput, PretextViews, SSLMethod, encode_views


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


class ExemplarCNN(SSLMethod):
    """Exemplar CNN: an N-way classifier over the seeds, each seed image its own class.

    Args:
        backbone: encoder mapping images to (N, feature_dim) features.
        feature_dim: backbone output dimension.
        num_images: the number of seeds N = surrogate classes (the paper: 8000-32000; pick
            them with ``data.limit``), supplied by the pipeline.
        hidden_dim: width of the fully connected layer before the softmax (the paper's nets
            end in 128, 512 or 1024 units: 64c5-64c5-128f ... 92c5-256c5-512c5-1024f); 0 for
            a linear classifier on the backbone features.
        dropout: dropout on that layer (the paper uses dropout on its fully connected layers).
        translation, scale_min, scale_max, rotation (degrees), pca_factor (contrast 1 factors
            in [1/f, f]), hsv_power (powers in [1/p, p]), hsv_factor_min, hsv_factor_max,
            hsv_offset (contrast 2), hue_shift (colour): the paper's ranges, its defaults.
        padding: how geometric transformations fill the border (``grid_sample`` mode).
    """

    num_views: ClassVar[int] = 2
    uses_image_indices: ClassVar[bool] = True

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        num_images: int,
        *,
        hidden_dim: int = 512,
        dropout: float = 0.5,
        translation: float = 0.2,
        scale_min: float = 0.7,
        scale_max: float = 1.4,
        rotation: float = 20.0,
        pca_factor: float = 2.0,
        hsv_power: float = 4.0,
        hsv_factor_min: float = 0.7,
        hsv_factor_max: float = 1.4,
        hsv_offset: float = 0.1,
        hue_shift: float = 0.1,
        padding: str = "reflection",
    ) -> None:
        super().__init__(backbone, feature_dim)
        if num_images < 2:
            raise ValueError(f"num_images (surrogate classes) must be >= 2, got {num_images}")
        if hidden_dim < 0 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"need hidden_dim >= 0, dropout in [0, 1): {hidden_dim}, {dropout}")
        if not (0 < scale_min <= scale_max and 0 < hsv_factor_min <= hsv_factor_max):
            raise ValueError("need 0 < scale_min <= scale_max, 0 < hsv_factor_min <= max")
        if min(translation, rotation, hsv_offset, hue_shift) < 0 or min(pca_factor, hsv_power) < 1:
            raise ValueError("ranges must be >= 0, and pca_factor and hsv_power >= 1")
        if padding not in ("zeros", "border", "reflection"):
            raise ValueError(f"padding must be 'zeros', 'border' or 'reflection', got {padding!r}")
        # The paper's nets end in a dropout fully connected layer, then the N-way softmax.
        layers: list[nn.Module] = []
        if hidden_dim:
            layers = [
                nn.Linear(feature_dim, hidden_dim),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
            ]
        self.classifier = nn.Sequential(*layers, nn.Linear(hidden_dim or feature_dim, num_images))

    @classmethod
    def pretext_views(cls, options: Mapping[str, Any]) -> PretextViews:
        names = ExemplarTransforms.__dataclass_fields__
        return ExemplarTransforms(**{name: options[name] for name in names})

    def forward(
        self,
        views: list[Tensor],
        indices: Tensor | None = None,
        targets: dict[str, Tensor] | None = None,
    ) -> MethodOutput:
        if not views or indices is None:
            raise ValueError("Exemplar CNN takes the transformed patches and the images' indices")
        logits = encode_views(self.backbone, views, self.classifier)  # one pass, views stacked
        labels = indices.repeat(len(views))  # every patch of seed i is class i
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.detach().argmax(1) == labels).float().mean()
        return MethodOutput(loss=loss, logs={"loss": loss.detach(), "pretext_accuracy": accuracy})
