"""Tiles and patches: exact pixel positions, checked against hand-made images."""

import pytest
import torch

from ssl_models.patches import grid_tiles, overlapping_patches


def _positions(n: int = 2, size: int = 12) -> torch.Tensor:
    """Images whose pixel (y, x) holds 100 * y + x, + 10000 * image index, 2 channels."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    base = (100 * y + x).float()
    return torch.stack([torch.stack([base + 10000 * i, -base]) for i in range(n)])


def test_centred_tiles_without_jitter_by_hand():
    images = _positions(size=12)  # 3x3 cells of 4 px, 2 px tiles centred: offset 1
    tiles = grid_tiles(images, grid=3, tile=2, generator=torch.Generator(), jitter=False)
    assert tiles.shape == (2, 9, 2, 2, 2)
    # Cell (row 1, col 2) = tile 5 starts at y = 4 + 1, x = 8 + 1.
    assert tiles[0, 5, 0].tolist() == [[509.0, 510.0], [609.0, 610.0]]
    assert torch.equal(tiles[1, 5, 0], tiles[0, 5, 0] + 10000)
    assert torch.equal(tiles[:, :, 1], -(tiles[:, :, 0] - 10000 * torch.arange(2).view(2, 1, 1, 1)))


def test_jittered_tiles_stay_inside_their_cells_and_vary():
    images = _positions(n=64, size=30)  # cells of 10 px, tiles of 7: offsets 0..3
    tiles = grid_tiles(images, grid=3, tile=7, generator=torch.Generator().manual_seed(0))
    top_left = tiles[:, :, 0, 0, 0] - 10000 * torch.arange(64).view(64, 1)
    y, x = top_left // 100, top_left % 100
    cells = torch.arange(9)
    assert torch.all((y - (cells // 3) * 10).clamp(0, 3) == y - (cells // 3) * 10)
    assert torch.all((x - (cells % 3) * 10).clamp(0, 3) == x - (cells % 3) * 10)
    assert len(set(top_left[:, 4].tolist())) > 4  # the centre tile moves between images
    # Every tile is a contiguous square: right neighbours +1, lower neighbours +100.
    assert torch.all(tiles[..., 0, :, 1:] - tiles[..., 0, :, :-1] == 1)
    assert torch.all(tiles[..., 0, 1:, :] - tiles[..., 0, :-1, :] == 100)


def test_tiles_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="do not fit"):
        grid_tiles(_positions(size=12), grid=3, tile=5, generator=torch.Generator())


def test_overlapping_patches_by_hand():
    patches = overlapping_patches(_positions(size=12), patch=4, stride=2)
    assert patches.shape == (2, 5, 5, 2, 4, 4)
    assert patches[0, 1, 3, 0, 0].tolist() == [206.0, 207.0, 208.0, 209.0]  # y 2, x 6
    assert patches[0, 4, 4, 0, 3, 3].item() == 1111.0  # the bottom-right pixel
