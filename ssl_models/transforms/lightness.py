"""Colorization's data stage (Zhang, Isola and Efros 2016, arXiv:1603.08511): the lightness
L of each image as the input and its chroma ab, subsampled, as the target. The lightness
ships as a gray 3-channel uint8 image (round(L * 255 / 100) in every channel), so any
backbone keeps its 3 input channels and the loop's normalisation applies."""

from dataclasses import dataclass

import torch
from torch import Tensor

from ssl_models.lab_color import srgb_to_lab


@dataclass(frozen=True)
class ColorizationViews:
    """Data stage: one augmented RGB view -> ``view_0``, the lightness as a gray uint8 image
    (N, 3, H, W), and ``target_ab``, float ab values at stride ``stride`` (N, 2, h, w)."""

    stride: int = 4

    def __call__(self, views: list[Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        """Split the one RGB view into lightness and colour; returns the keys above."""
        (images,) = views
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                "colorization predicts colour from lightness and needs 3-channel RGB images, "
                f"got shape {tuple(images.shape)}; use a colour dataset (e.g. CIFAR-10)"
            )
        lab = srgb_to_lab(images.float() / 255)
        gray = (lab[:, :1] * (255 / 100)).round().clamp(0, 255).to(torch.uint8)
        # The official net subsamples with a stride-4 1x1 convolution of weight 1: the top-left
        # pixel of each 4 x 4 block, a real colour rather than a blend across edges.
        ab = lab[:, 1:, :: self.stride, :: self.stride]
        return {"view_0": gray.expand(-1, 3, -1, -1).contiguous(), "target_ab": ab.contiguous()}
