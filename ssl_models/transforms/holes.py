"""Context encoders' data stage (Pathak et al. 2016, arXiv:1604.07379, Sec. 3.3): the region
each image hides, a quarter of it. ``central_block`` (half the side), ``random_blocks``
(smaller, possibly overlapping squares, "up to 1/4") and ``random_region`` (the paper's
feature-learning choice; the paper deforms PASCAL VOC segmentation masks, the authors'
released code, ``train_random.lua``, thresholds smooth random noise instead, as done here)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

MASK_SHAPES = ("central_block", "random_blocks", "random_region")


#: Candidate blocks per image for ``random_blocks``: plenty to reach the coverage.
BLOCK_TRIES = 32


#: Noise cells across the image for ``random_region``: the released code's pattern has one
#: per 1 / 0.06 px, about 8 across its 128 px crops.
REGION_CELLS = 8


@dataclass(frozen=True)
class HoleMasks:
    """The data stage's transform: ``view_0`` is the augmented image, ``target_mask`` the
    hole, (N, H, W) bool. Picklable; randomness from the CPU generator."""

    mask_shape: str = "random_region"
    coverage: float = 0.25

    def __call__(self, views: list[Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        """Draw a hole for each image of the one view; returns the keys above."""
        (images,) = views
        n, _, height, width = images.shape
        return {
            "view_0": images,
            "target_mask": self.draw(n, height, width, generator, images.device),
        }

    def draw(
        self, n: int, height: int, width: int, generator: torch.Generator, device: torch.device
    ) -> Tensor:
        """(n, height, width) bool holes of ``mask_shape`` on ``device``."""
        if self.mask_shape == "central_block":
            return central_block(n, height, width, device)
        if self.mask_shape == "random_blocks":
            return random_blocks(n, height, width, self.coverage, generator, device)
        return random_region(n, height, width, self.coverage, generator, device)


def central_block(n: int, height: int, width: int, device: torch.device | str = "cpu") -> Tensor:
    """The centred block of half the height and width (a quarter of the image)."""
    h, w = height // 2, width // 2
    top, left = (height - h) // 2, (width - w) // 2
    mask = torch.zeros(n, height, width, dtype=torch.bool, device=device)
    mask[:, top : top + h, left : left + w] = True
    return mask


def random_blocks(
    n: int,
    height: int,
    width: int,
    coverage: float,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Squares of 1/8 to 1/4 of the side at uniform positions, each kept if the union still
    covers at most ``coverage`` of the image ("up to 1/4"). The paper gives no block size;
    this range takes 4 to 16 blocks to fill the quarter."""
    side = min(height, width)
    low, high = max(1, round(side / 8)), max(1, round(side / 4))
    sizes = torch.randint(low, high + 1, (BLOCK_TRIES, n), generator=generator)
    tops = (torch.rand(BLOCK_TRIES, n, generator=generator) * (height - sizes + 1)).long()
    lefts = (torch.rand(BLOCK_TRIES, n, generator=generator) * (width - sizes + 1)).long()
    sizes, tops, lefts = sizes.to(device), tops.to(device), lefts.to(device)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    mask = torch.zeros(n, height, width, dtype=torch.bool, device=device)
    budget = coverage * height * width
    for size, top, left in zip(sizes, tops, lefts, strict=True):
        in_rows = (rows >= top[:, None]) & (rows < (top + size)[:, None])  # (N, H)
        in_cols = (cols >= left[:, None]) & (cols < (left + size)[:, None])  # (N, W)
        grown = mask | (in_rows[:, :, None] & in_cols[:, None, :])
        fits = grown.flatten(1).sum(1) <= budget
        mask = torch.where(fits[:, None, None], grown, mask)
    return mask


def random_region(
    n: int,
    height: int,
    width: int,
    coverage: float,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Smooth random shapes: uniform noise on a coarse grid, upsampled bicubically, its
    lowest ``coverage`` quantile masked (the released code thresholds at 0.25 and redraws
    until 20-30% is covered; a per-image quantile covers exactly the fraction)."""
    noise = torch.rand(n, 1, REGION_CELLS, REGION_CELLS, generator=generator).to(device)
    smooth = F.interpolate(noise, size=(height, width), mode="bicubic", align_corners=False)
    smooth = smooth.flatten(1)
    k = max(1, round(coverage * height * width))
    threshold = smooth.kthvalue(k, dim=1).values
    return (smooth <= threshold[:, None]).view(n, height, width)
