"""Context prediction's data stage (Doersch, Gupta and Efros 2015, arXiv:1505.05192,
Sections 3-4 and cdoersch/deepcontext): each image's centre patch and one random neighbour
of a 3 x 3 grid, labelled by the neighbour's position, with the paper's tricks against
shortcuts: gap and jitter (no edge or line continued across borders), pixelation
(robustness to low resolution), and colour projection or dropping (chromatic aberration
shifts green against magenta away from the lens centre).

The geometry keeps the paper's ratios at any size: ``side // 3`` px cells of a tile plus a
gap of ``gap_ratio`` tiles (48 / 96), tiles jittered by ``jitter_ratio`` tiles (7 / 96, at
least 1 px). 28 px: 9 px cells, 6 px tiles, 3 px gaps, +-1 px; 32 px: 7 px tiles; 432 px:
the paper's 96 / 48 / 7. Tiles stay ``gap - 2 * jitter`` px apart or more (paper: 34 px).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_models.patches import grid_tiles

GRID, CENTRE, NUM_POSITIONS = 3, 4, 8  # 3 x 3 cells; the centre is cell 4 in row-major order


COLOURS = ("projection", "drop", "none")


def patch_geometry(side: int, gap_ratio: float, jitter_ratio: float) -> tuple[int, int]:
    """(tile, jitter) px for images of ``side`` px: cells of tile + gap, jitter >= 1 px."""
    cell = side // GRID
    tile = round(cell / (1 + gap_ratio))
    jitter = max(1, round(jitter_ratio * tile)) if jitter_ratio > 0 else 0
    if tile < 1 or tile + 2 * jitter > cell:
        raise ValueError(
            f"a {GRID}x{GRID} grid of {side} px cells ({cell} px) leaves no room for {tile} px "
            f"patches jittered by {jitter} px: raise gap_ratio or the image size"
        )
    return tile, jitter


def pixelate(patches: Tensor, prob: float, generator: torch.Generator) -> Tensor:
    """Each uint8 patch (M, C, t, t), with probability ``prob``, resized bilinearly down to
    a side drawn as the code does ("as little as 100 total pixels" of 96 x 96: from 10 / 96
    of the tile, but 2 px at least, a 1 px patch being constant, to tile - 1) and back up."""
    m, tile = len(patches), patches.shape[-1]
    low = max(2.0, tile * 10 / 96)
    if tile - 1 < low:
        return patches  # too small to lose resolution and keep any
    chosen = torch.rand(m, generator=generator) < prob
    u = torch.rand(m, generator=generator)
    sides = (u * ((tile - 1) ** 2 - low**2) + low**2).sqrt().long()
    out = patches.clone()
    for side in sides[chosen].unique().tolist():
        rows = (chosen & (sides == side)).nonzero().flatten().to(patches.device)
        x = patches[rows].float()
        small = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True)
        back = F.interpolate(small, size=(tile, tile), mode="bilinear")
        out[rows] = back.round().clamp(0, 255).to(torch.uint8)
    return out


def project_colours(patches: Tensor) -> Tensor:
    """Multiply every pixel of uint8 RGB patches (..., 3, t, t) by I - a a^T / (a^T a), which
    removes the green-magenta axis a = [-1, 2, -1]. Results reach 170 from mid-grey, so a 3/4
    scale about it fits uint8 unclipped (``forward``'s normalisation undoes the scale)."""
    a = torch.tensor([-1.0, 2.0, -1.0], device=patches.device)
    matrix = torch.eye(3, device=patches.device) - torch.outer(a, a) / a.dot(a)
    x = torch.einsum("ij,...jhw->...ihw", matrix, patches.float())
    return ((x - 127.5) * 0.75 + 127.5).round().clamp(0, 255).to(torch.uint8)


def drop_colours(patches: Tensor, generator: torch.Generator) -> Tensor:
    """Keep one random channel of each uint8 RGB patch (M, 3, t, t) and replace the other two
    with Gaussian noise of 1/100 the kept channel's std (Section 3), about mid-grey. In uint8
    the noise is rounded to whole levels, the scale of the code's uniform +-0.5 noise."""
    m, device = len(patches), patches.device
    keep = torch.randint(0, 3, (m,), generator=generator)
    kept = patches[torch.arange(m, device=device), keep.to(device)].float()
    std = kept.flatten(1).std(dim=1, correction=0).view(m, 1, 1, 1)
    noise = torch.randn(patches.shape, generator=generator).to(device) * std / 100 + 128
    mask = F.one_hot(keep, 3).bool().view(m, 3, 1, 1).to(device)
    return torch.where(mask, patches, noise.round().clamp(0, 255).to(torch.uint8))


@dataclass(frozen=True)
class NeighbourPairs:
    """Data-stage transform: each image's centre patch and one random neighbour, labelled by
    the neighbour's position 0..7 (row-major over the 3 x 3 grid, skipping the centre)."""

    gap_ratio: float
    jitter_ratio: float
    pixelate_prob: float
    colour: str

    def __call__(self, views: list[Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        """Draw a centre-neighbour pair from each image of the one view."""
        (images,) = views  # uint8 (N, C, H, W)
        n, channels, device = len(images), images.shape[1], images.device
        tile, jitter = patch_geometry(min(images.shape[-2:]), self.gap_ratio, self.jitter_ratio)
        # A window of tile + 2 * jitter px centred in each cell; the tile is jittered inside
        # it, so a gap of at least cell - tile - 2 * jitter px always separates neighbours.
        windows = grid_tiles(images, GRID, tile + 2 * jitter, generator, jitter=False)
        position = torch.randint(0, NUM_POSITIONS, (n,), generator=generator)
        cell = (position + (position >= CENTRE).long()).to(device)  # skip the centre cell
        chosen = torch.stack([windows[:, CENTRE], windows[torch.arange(n, device=device), cell]], 1)
        patches = grid_tiles(chosen.flatten(0, 1), 1, tile, generator, jitter=jitter > 0)[:, 0]
        if self.pixelate_prob > 0:
            patches = pixelate(patches, self.pixelate_prob, generator)
        if channels == 3 and self.colour == "projection":
            patches = project_colours(patches)
        elif channels == 3 and self.colour == "drop":
            patches = drop_colours(patches, generator)
        pairs = patches.view(n, 2, *patches.shape[1:])
        return {"view_0": pairs, "target_position": position.to(device)}
