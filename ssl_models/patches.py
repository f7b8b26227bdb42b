"""Cutting images into patches for the spatial pretext tasks, in the data stage.

- :func:`grid_tiles`: a ``grid`` x ``grid`` layout of cells with one ``tile`` px square
  per cell at a random offset inside it, so neighbouring tiles are separated by a gap and
  jittered (Doersch et al. 2015 and Noroozi & Favaro 2016 use both against the shortcut
  of matching edges and continuing lines across tiles). Context prediction, jigsaw and PIRL.
- :func:`overlapping_patches`: the regular grid of overlapping patches CPC encodes
  (van den Oord et al. 2018: 64 px patches at a 32 px stride).
- :func:`standardize_tiles`: each tile on its own to zero mean and unit variance, Noroozi
  & Favaro's guard against matching tiles by brightness and contrast (jigsaw, PIRL).

Offsets are drawn from a CPU generator (the data stage's), whatever device the images are
on, so a seed gives the same tiles on any device.
"""

import torch
from torch import Tensor


def grid_tiles(
    images: Tensor, grid: int, tile: int, generator: torch.Generator, jitter: bool = True
) -> Tensor:
    """Tiles (N, grid * grid, C, tile, tile) of images (N, C, H, W), in row-major order of
    their cells.

    The central ``grid * cell`` square of each image (``cell = min(H, W) // grid``) is cut
    into cells; each tile sits at an offset in [0, cell - tile] inside its cell, drawn per
    image and tile when ``jitter``, else centred.
    """
    n, channels, height, width = images.shape
    cell = min(height, width) // grid
    if not 1 <= tile <= cell:
        raise ValueError(
            f"{grid}x{grid} tiles of {tile} px do not fit a {height}x{width} image: cells "
            f"are {cell} px; lower the tile size or resize the images up"
        )
    top, left = (height - grid * cell) // 2, (width - grid * cell) // 2
    slack = cell - tile
    if jitter:
        offsets = torch.randint(0, slack + 1, (n, grid * grid, 2), generator=generator)
    else:
        offsets = torch.full((n, grid * grid, 2), slack // 2)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    y0 = top + rows.reshape(1, -1) * cell + offsets[..., 0]  # (N, grid * grid)
    x0 = left + cols.reshape(1, -1) * cell + offsets[..., 1]
    steps = torch.arange(tile)
    ys = (y0.unsqueeze(-1) + steps).to(images.device)  # (N, T, tile)
    xs = (x0.unsqueeze(-1) + steps).to(images.device)
    batch = torch.arange(n, device=images.device).view(n, 1, 1, 1)
    # Advanced indexing: (N, T, tile, tile) pixel positions for every channel.
    picked = images.permute(0, 2, 3, 1)[batch, ys.unsqueeze(-1), xs.unsqueeze(-2)]
    return picked.permute(0, 1, 4, 2, 3).contiguous()


def overlapping_patches(images: Tensor, patch: int, stride: int) -> Tensor:
    """All ``patch`` px squares of images (N, C, H, W) at ``stride`` px steps, shape
    (N, rows, cols, C, patch, patch), rows and columns in image order."""
    n, channels, height, width = images.shape
    if patch > min(height, width) or stride < 1:
        raise ValueError(f"{patch} px patches at stride {stride} do not fit {height}x{width}")
    windows = images.unfold(2, patch, stride).unfold(3, patch, stride)  # (N, C, r, c, p, p)
    return windows.permute(0, 2, 3, 1, 4, 5).contiguous()


def standardize_tiles(tiles: Tensor, eps: float = 1e-5) -> Tensor:
    """Each tile and channel of (..., C, t, t) to zero mean and unit (population) standard
    deviation; a flat tile channel becomes zeros."""
    mean = tiles.mean(dim=(-2, -1), keepdim=True)
    std = tiles.std(dim=(-2, -1), keepdim=True, correction=0)
    return (tiles - mean) / std.clamp_min(eps)
