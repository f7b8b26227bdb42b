"""Cutting images into patches, and choosing which patches to hide.

In the data stage, for the spatial pretext tasks:

- :func:`grid_tiles`: a ``grid`` x ``grid`` layout of cells with one ``tile`` px square
  per cell at a random offset inside it, so neighbouring tiles are separated by a gap and
  jittered (Doersch et al. 2015 and Noroozi & Favaro 2016 use both against the shortcut
  of matching edges and continuing lines across tiles). Context prediction, jigsaw and PIRL.
- :func:`overlapping_patches`: the regular grid of overlapping patches CPC encodes
  (van den Oord et al. 2018: 64 px patches at a 32 px stride).
- :func:`standardize_tiles` (jigsaw, PIRL) and :func:`normalise_patches` (context
  prediction), in the model: each tile on its own to zero mean and unit variance or RMS,
  the guard against matching tiles by brightness and contrast.

Offsets are drawn from a CPU generator (the data stage's), whatever device the images are
on, so a seed gives the same tiles on any device.

In the model, for masked-image modelling (MAE, He et al. 2022, arXiv:2111.06377; SimMIM, Xie
et al. 2022, arXiv:2111.09886), as in the official MAE code (``models_mae.py``):

- :func:`patchify` / :func:`unpatchify`: (N, C, H, W) <-> (N, L, p*p*C), row-major patches,
  channels last;
- :func:`random_masking`: a uniformly random subset of :func:`num_masked` patches per sample,
  by sorting noise (``ids_shuffle = argsort(noise)``, ``ids_restore = argsort(ids_shuffle)``);
  :func:`expand_block_mask` turns a mask over blocks into one over patches (SimMIM);
- :func:`gather_tokens`: the tokens of given patches (MAE's visible ones).
"""

from typing import NamedTuple

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


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(N, C, H, W) -> (N, L, patch_size^2 * C): one row per patch, patches in row-major
    order, each row the patch's pixels in row-major order with channels last (the official
    ``einsum("nchpwq->nhwpqc")``). H and W must be multiples of ``patch_size``."""
    n, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
    x = images.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, patch_size: int, grid_h: int, grid_w: int) -> Tensor:
    """Inverse of :func:`patchify`: (N, grid_h * grid_w, p^2 * C) -> (N, C, grid_h * p,
    grid_w * p), e.g. to look at a reconstruction."""
    n, length, dim = patches.shape
    p = patch_size
    if length != grid_h * grid_w or dim % (p * p):
        raise ValueError(
            f"patches of shape {tuple(patches.shape)} do not form a {grid_h}x{grid_w} grid "
            f"of {p}x{p} patches"
        )
    c = dim // (p * p)
    x = patches.reshape(n, grid_h, grid_w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, c, grid_h * p, grid_w * p)


def num_masked(length: int, mask_ratio: float) -> int:
    """Patches (or blocks) to mask out of ``length``: ``round(length * mask_ratio)``. The
    official codes round up instead (MAE keeps ``int(L * (1 - r))``, SimMIM masks
    ``ceil(L * r)``): at most one more when ``L * r`` is not a whole number, none at the
    papers' settings (L = 196, r = 0.75; 36 blocks, r = 0.6 gives 21.6 -> 22 both ways)."""
    count = round(length * mask_ratio)
    if not 0 < count < length:
        raise ValueError(
            f"mask_ratio {mask_ratio} masks {count} of {length} patches; "
            "at least one must be masked and one visible"
        )
    return count


class Masking(NamedTuple):
    """A random mask per sample, as :func:`random_masking` draws it."""

    mask: Tensor  # (N, L) bool, True where the patch is masked
    ids_keep: Tensor  # (N, L - M) visible patches' indices, in shuffled order
    ids_restore: Tensor  # (N, L) inverse of the shuffle: gather [visible, masked] to unshuffle


def random_masking(
    batch: int,
    length: int,
    mask_ratio: float,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Masking:
    """Mask :func:`num_masked` of ``length`` patches in each of ``batch`` samples, a new
    uniformly random subset per sample, by sorting uniform noise (official MAE)."""
    keep = length - num_masked(length, mask_ratio)
    noise = torch.rand(batch, length, device=device, generator=generator)
    ids_shuffle = noise.argsort(dim=1)  # the first `keep` are visible
    ids_restore = ids_shuffle.argsort(dim=1)  # each patch's rank in the shuffle
    return Masking(ids_restore >= keep, ids_shuffle[:, :keep], ids_restore)


def expand_block_mask(block_mask: Tensor, blocks_h: int, blocks_w: int, scale: int) -> Tensor:
    """A mask over a ``blocks_h`` x ``blocks_w`` grid of blocks, (N, blocks_h * blocks_w),
    as a mask over the patches, (N, blocks_h * scale * blocks_w * scale) in row-major order:
    each block covers ``scale`` x ``scale`` patches (SimMIM's mask patches)."""
    n = block_mask.shape[0]
    grid = block_mask.reshape(n, blocks_h, blocks_w)
    return grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2).flatten(1)


def gather_tokens(tokens: Tensor, ids: Tensor) -> Tensor:
    """``tokens[n, ids[n]]`` for each sample: (N, L, D) and (N, K) indices -> (N, K, D)."""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def normalise_patches(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """Each patch (..., C, t, t) on its own: every channel's mean removed, then the patch
    divided by its root mean square (the code's mean subtraction and variance normalisation)."""
    x = patches - patches.mean(dim=(-2, -1), keepdim=True)
    return x * torch.rsqrt(x.square().mean(dim=(-3, -2, -1), keepdim=True) + eps)
