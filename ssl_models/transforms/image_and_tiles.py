"""PIRL's data stage (Misra & van der Maaten 2020, arXiv:1912.01991, Sections 3-4): an image
view and the jigsaw tiles of another (Noroozi & Favaro 2016's pre-processing: one tile at a
random offset in each cell of a 3x3 grid), in a random order that nothing predicts."""

from dataclasses import dataclass

import torch
from torch import Tensor

from ssl_models.patches import grid_tiles


@dataclass(frozen=True)
class JigsawTiles:
    """Data stage: ``view_0`` = the first augmented view, ``view_1`` = the second view's
    grid x grid tiles (N, grid^2, C, t, t), shuffled per image; t = round(cell * tile_ratio)."""

    grid: int
    tile_ratio: float
    jitter: bool

    def __call__(self, views: list[Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        """Keep the first view, tile the second; returns the keys above."""
        image, other = views
        cell = min(other.shape[-2:]) // self.grid
        tile = max(1, round(cell * self.tile_ratio))
        tiles = grid_tiles(other, self.grid, tile, generator, self.jitter)
        n, count = tiles.shape[:2]
        order = torch.rand(n, count, generator=generator).argsort(dim=1).to(tiles.device)
        rows = torch.arange(n, device=tiles.device).unsqueeze(1)
        return {"view_0": image, "view_1": tiles[rows, order]}
