"""CPC's data stage (van den Oord, Li and Vinyals 2018, arXiv:1807.03748, Section 3.2): each
image as a grid of overlapping patches (the paper: 7x7 patches of 64 px at a 32 px stride on
256 px images), each cut to a random subcrop and padded back (60 of 64 px), so overlapping
patches no longer line up pixel for pixel."""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ssl_models.patches import overlapping_patches


def patch_grid(images: Tensor, patch: int, stride: int) -> Tensor:
    """Overlapping patches (N, R * C, ch, p, p) of images (N, ch, H, W), row-major; a grid
    that does not tile the image exactly is centred (the paper's 64 / 32 px tile 256 px)."""
    height, width = images.shape[-2:]
    if not 1 <= patch <= min(height, width):
        raise ValueError(f"{patch} px patches do not fit {height}x{width} images")
    used_h, used_w = ((side - patch) // stride * stride + patch for side in (height, width))
    top, left = (height - used_h) // 2, (width - used_w) // 2
    grid = overlapping_patches(images[..., top : top + used_h, left : left + used_w], patch, stride)
    return grid.flatten(1, 2)


def jitter_patches(patches: Tensor, side: int, generator: torch.Generator) -> Tensor:
    """Each uint8 patch (M, ch, p, p) cut to a random ``side`` px subcrop and padded back to
    p px around it (the paper's 60 of 64 px), so overlapping patches no longer line up pixel
    for pixel. The padding is the patch's own mean per channel: no new edge, as the paper's
    zero padding of zero-centred inputs adds none."""
    m, p, device = len(patches), patches.shape[-1], patches.device
    offsets = torch.randint(0, p - side + 1, (m, 2), generator=generator).to(device)
    steps = torch.arange(side, device=device)
    ys, xs = offsets[:, :1] + steps, offsets[:, 1:] + steps  # (M, side)
    rows = torch.arange(m, device=device).view(m, 1, 1)
    crops = patches.permute(0, 2, 3, 1)[rows, ys.unsqueeze(-1), xs.unsqueeze(-2)]  # (M, s, s, ch)
    fill = patches.float().mean(dim=(-2, -1), keepdim=True).round().to(patches.dtype)
    out = fill.expand_as(patches).clone()
    start = (p - side) // 2
    out[..., start : start + side, start : start + side] = crops.permute(0, 3, 1, 2)
    return out


@dataclass(frozen=True)
class PatchGridViews:
    """Data-stage transform: each image's grid of overlapping, jittered patches."""

    patch: int
    stride: int
    crop: float
    greyscale: bool

    def __call__(self, views: list[Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        """Cut the one view into its patch grid."""
        (images,) = views  # uint8 (N, ch, S, S)
        if images.shape[-2] != images.shape[-1]:
            raise ValueError(f"CPC needs square images (a square grid), got {images.shape}")
        if self.greyscale and images.shape[1] == 3:  # the paper's greyscale 256 px images
            luma = torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)
            grey = (images.float() * luma).sum(1, keepdim=True).round().to(torch.uint8)
            images = grey.expand_as(images).contiguous()
        patches = patch_grid(images, self.patch, self.stride)
        side = math.floor(self.patch * self.crop)
        if side < self.patch:
            patches = jitter_patches(patches.flatten(0, 1), side, generator).view_as(patches)
        return {"view_0": patches}
