"""Jigsaw puzzles' data stage (Noroozi and Favaro 2016, arXiv:1603.09246, Section 3 and
Algorithm 1): a fixed set of permutations with maximal Hamming distance, and each image cut
into 9 tiles shuffled by one of them, labelled by its index in the set.

Order convention: the tile at position j of the shuffled view is original cell ``P[y][j]``
(cells in row-major order), as in the reference loader (bbrattoli/JigsawPuzzlePytorch:
``data = [tiles[perm[t]] for t in range(9)]``).

Against shortcuts (Section 3.3): the paper cuts 64 px tiles at random places in 75 px cells
of a 225 px crop, so tiles never share an edge; here the tile is the same 64/75 of a cell.
Against chromatic aberration it jitters each tile's colour channels by +-0, +-1, +-2 pixels
(2/64 of the tile side here, 0 px below 16 px tiles) and mixes in grayscale images (30% in
the reference loader, per image).
"""

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from ssl_models.patches import grid_tiles

GRID = 3


NUM_TILES = GRID * GRID


#: The paper's tile / cell side: 64 px tiles in 75 px cells.
TILE_FRACTION = 64 / 75


def lexicographic_permutations(items: int) -> np.ndarray:
    """All ``items!`` permutations of range(items) as rows, in lexicographic order
    (``itertools.permutations``' order), built without a Python loop over rows."""
    perms = np.zeros((1, 1), dtype=np.int8)
    for k in range(2, items + 1):
        first = np.repeat(np.arange(k, dtype=np.int8), len(perms))[:, None]
        rest = np.tile(perms, (k, 1))
        perms = np.concatenate([first, rest + (rest >= first)], axis=1)  # skip the first
    return perms


@lru_cache(maxsize=8)
def _hamming_set(size: int, seed: int, items: int) -> np.ndarray:
    candidates = lexicographic_permutations(items)
    n = len(candidates)
    if not 1 <= size <= n:
        raise ValueError(f"cannot choose {size} of the {n} permutations of {items} items")
    columns = np.ascontiguousarray(candidates.T)
    # D-bar of Algorithm 1: each candidate's summed Hamming distance to the chosen set.
    summed = np.zeros(n, dtype=np.int32)
    matches, equal = np.empty(n, dtype=np.uint8), np.empty(n, dtype=bool)
    chosen = np.empty(size, dtype=np.int64)
    j = int(np.random.default_rng(seed).integers(n))  # the first one at random
    for i in range(size):
        chosen[i] = j
        matches[:] = 0
        for k in range(items):  # 9 vector compares instead of a (n, 9) temporary
            np.equal(columns[k], candidates[j, k], out=equal)
            matches += equal
        summed += items - matches.astype(np.int32)
        summed[chosen[: i + 1]] = -1  # each is taken once
        j = int(summed.argmax())  # ties: the lexicographically first, as the reference code
    out = candidates[chosen].astype(np.int64)
    out.flags.writeable = False  # cached: shared by every caller
    return out


def maximal_hamming_permutations(size: int, seed: int = 0, items: int = NUM_TILES) -> Tensor:
    """Algorithm 1: ``size`` permutations of ``items`` tiles, (size, items) int64, chosen
    greedily from all ``items!``: the first at random (``seed``), then each time the one with
    the largest summed (average) Hamming distance to those already chosen. The first
    ``items`` form a Latin square; 100 and 1000 give average distances 8.08 and 8.00."""
    return torch.from_numpy(_hamming_set(size, seed, items).copy())


def _shift_channels(tiles: Tensor, tile: int, shifts: Tensor) -> Tensor:
    """Cut each channel of tiles (N, T, C, B, B) at its own offset ``shifts`` (N, T, C, 2)
    in [0, B - tile]: (N, T, C, tile, tile)."""
    steps = torch.arange(tile, device=tiles.device)
    ys = shifts[..., 0, None, None] + steps[:, None]  # (N, T, C, tile, 1)
    xs = shifts[..., 1, None, None] + steps[None, :]  # (N, T, C, 1, tile)
    n, t, c = (torch.arange(size, device=tiles.device) for size in tiles.shape[:3])
    return tiles[n.view(-1, 1, 1, 1, 1), t.view(1, -1, 1, 1, 1), c.view(1, 1, -1, 1, 1), ys, xs]


@dataclass(frozen=True)
class ShuffledTiles:
    """Data-stage transform: 9 tiles per image, shuffled by a random permutation of the set.

    Returns ``view_0`` (N, 9, C, t, t) uint8 and ``target_permutation`` (N,) int64, the
    permutation's index in the set :func:`maximal_hamming_permutations` chooses from
    (``num_permutations``, ``permutation_seed``): each process chooses it once, on first use
    (cached), so the transform pickles small. ``tile_size`` 0: 64/75 of a cell's side.
    """

    num_permutations: int = 1000
    permutation_seed: int = 0
    tile_size: int = 0
    grayscale_prob: float = 0.3
    channel_jitter: float = 2 / 64

    def __call__(self, views: list[Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        """Cut and shuffle the one view's tiles; returns the keys above."""
        (images,) = views  # uint8 (N, C, H, W)
        n, channels, height, width = images.shape
        device = images.device
        cell = min(height, width) // GRID
        tile = self.tile_size or max(1, round(TILE_FRACTION * cell))
        colour = channels == 3
        gray = torch.zeros(n, dtype=torch.bool)
        if colour and self.grayscale_prob > 0:
            gray = torch.rand(n, generator=generator) < self.grayscale_prob
            weights = torch.tensor([0.299, 0.587, 0.114], device=device).view(1, 3, 1, 1)
            luma = (images.float() * weights).sum(1, keepdim=True).round().to(images.dtype)
            images = torch.where(gray.to(device).view(n, 1, 1, 1), luma, images)
        # Channel shifts are cut from a tile 2 * shift larger, so they never leave the cell.
        shift = min(round(self.channel_jitter * tile), (cell - tile) // 2) if colour else 0
        tiles = grid_tiles(images, GRID, tile + 2 * shift, generator)
        if shift:
            offsets = torch.randint(0, 2 * shift + 1, (n, NUM_TILES, 3, 2), generator=generator)
            offsets[gray] = shift  # a grayscale image keeps its channels aligned
            tiles = _shift_channels(tiles, tile, offsets.to(device))
        permutations = maximal_hamming_permutations(self.num_permutations, self.permutation_seed)
        labels = torch.randint(0, len(permutations), (n,), generator=generator)
        order = permutations[labels].to(device)  # (N, 9)
        shuffled = tiles[torch.arange(n, device=device)[:, None], order]  # position j: order[j]
        return {"view_0": shuffled, "target_permutation": labels.to(device)}
