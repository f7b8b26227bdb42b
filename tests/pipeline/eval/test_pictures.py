"""Retrieval grids, augmentation previews and the projector: sizes, frames, pixels, seeds."""

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboardX import SummaryWriter

from pipeline.eval.pictures import (
    BORDER,
    FIRST_FRAME,
    GAP,
    MATCH,
    MISMATCH,
    PAD,
    add_projector,
    augmentation_preview,
    nearest_neighbours,
    retrieval_grid,
)
from ssl_models.transforms.views import ViewRecipe, random_views


def _images(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _slot_origin(row: int, col: int, slot: int) -> tuple[int, int]:
    """Top-left pixel of a full-size image's frame in the grid."""
    return PAD + col * (slot + PAD) + (GAP if col else 0), PAD + row * (slot + PAD)


def test_retrieval_grid_size_frames_and_pixels(tmp_path):
    queries, neighbours = _images(2, 3, 8, 8), _images(2, 3, 3, 8, 8, seed=1)
    path = retrieval_grid(
        queries,
        neighbours,
        tmp_path / "grid.png",
        query_labels=[4, 7],
        neighbour_labels=np.array([[4, 1, 4], [7, 7, 0]]),
    )
    with Image.open(path) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        # 8 px * scale 2 + 2 * 3 border = 22 px slots: 4 + 4 * 26 + 12 wide, 4 + 2 * 26 high.
        assert png.size == (120, 56)
        grid = np.asarray(png)
    slot = 8 * 2 + 2 * BORDER
    expected = [[MATCH, MISMATCH, MATCH], [MATCH, MATCH, MISMATCH]]
    for row in range(2):
        x, y = _slot_origin(row, 0, slot)
        assert tuple(grid[y, x]) == FIRST_FRAME
        assert tuple(grid[y + BORDER, x + BORDER]) == tuple(queries[row, :, 0, 0])
        for j in range(3):
            x, y = _slot_origin(row, j + 1, slot)
            assert tuple(grid[y, x]) == expected[row][j]
            assert tuple(grid[y + slot - 1, x + slot - 1]) == expected[row][j]
            # Each source pixel is a sharp scale x scale square.
            inner = grid[y + BORDER + 2 : y + BORDER + 4, x + BORDER + 4 : x + BORDER + 6]
            assert (inner == neighbours[row, j, :, 1, 2]).all()


def test_grayscale_grid_without_labels_is_rgb_with_background_frames(tmp_path):
    queries, neighbours = _images(1, 1, 5, 5), _images(1, 2, 1, 5, 5, seed=1)
    with Image.open(retrieval_grid(queries, neighbours, tmp_path / "g.png", scale=3)) as png:
        assert png.mode == "RGB"
        assert png.size == (4 + 3 * (15 + 6 + 4) + 12, 4 + 1 * (15 + 6 + 4))
        grid = np.asarray(png)
    x, y = _slot_origin(0, 1, 15 + 2 * BORDER)
    assert tuple(grid[y, x]) == (255, 255, 255)
    assert tuple(grid[y + BORDER, x + BORDER]) == (neighbours[0, 0, 0, 0, 0],) * 3


def test_retrieval_grid_rejects_mismatched_inputs(tmp_path):
    queries = _images(2, 3, 8, 8)
    with pytest.raises(ValueError, match="neighbour_pixels"):
        retrieval_grid(queries, _images(3, 2, 3, 8, 8), tmp_path / "x.png")
    with pytest.raises(ValueError, match="neighbour_pixels"):
        retrieval_grid(queries, _images(2, 2, 3, 4, 4), tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"neighbour_labels \(\) must be \(2,\) and \(2, 2\)"):
        retrieval_grid(queries, _images(2, 2, 3, 8, 8), tmp_path / "x.png", query_labels=[0, 1])
    with pytest.raises(ValueError, match="uint8"):
        retrieval_grid(queries.astype(np.float32), _images(2, 2, 3, 8, 8), tmp_path / "x.png")


def test_nearest_neighbours_by_cosine_and_excluding_self():
    bank = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.3], [-1.0, 0.0], [1.0, 1.0]])
    # Cosine to [1, 0]: 1, 0, 0.995, -1, 0.707; scale does not matter, direction does.
    query = torch.tensor([[5.0, 0.0]])
    assert nearest_neighbours(query, bank, 3, exclude_self=False).tolist() == [[0, 2, 4]]
    # The queries are bank rows 0 and 1; each loses itself, even though row 0 is a perfect
    # match for itself. Row 1 ([0, 2]) is nearest to [1, 1], then [3, 0.3].
    got = nearest_neighbours(bank[:2], bank, 2, exclude_self=True)
    assert got.tolist() == [[2, 4], [4, 2]]
    with pytest.raises(ValueError, match=r"k <= 4 bank rows \(k=5\)"):
        nearest_neighbours(bank, bank, 5, exclude_self=True)
    with pytest.raises(ValueError, match="same D"):
        nearest_neighbours(torch.ones(1, 3), bank, 1, exclude_self=False)


def test_augmentation_preview_is_seeded_and_sized(tmp_path):
    pixels = _images(3, 3, 16, 16)
    recipe = ViewRecipe.simclr(12, strength=1.0)
    a = augmentation_preview(pixels, [recipe], 4, tmp_path / "a.png", seed=7)
    b = augmentation_preview(pixels, [recipe], 4, tmp_path / "b.png", seed=7)
    c = augmentation_preview(pixels, [recipe], 4, tmp_path / "c.png", seed=8)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    with Image.open(a) as png:
        assert png.mode == "RGB"
        # Slots fit the 16 px originals: 32 + 6 = 38 px; 5 columns, 3 rows.
        assert png.size == (4 + 5 * 42 + 12, 4 + 3 * 42)
        grid = np.asarray(png)
    x, y = _slot_origin(2, 0, 38)
    assert tuple(grid[y + BORDER, x + BORDER]) == tuple(pixels[2, :, 0, 0])
    # The first view column is the first draw from the seeded generator, its 24 px tile
    # centred in the 32 px box.
    first = random_views(torch.from_numpy(pixels), recipe, torch.Generator().manual_seed(7))
    x, y = _slot_origin(1, 1, 38)
    assert tuple(grid[y + 4 + BORDER, x + 4 + BORDER]) == tuple(first[1, :, 0, 0].tolist())
    assert tuple(grid[y + BORDER, x + BORDER]) == (255, 255, 255)


def test_projector_writes_config_and_sprite_for_grayscale(tmp_path):
    pixels = _images(5, 1, 8, 8)
    writer = SummaryWriter(str(tmp_path))
    add_projector(writer, torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0]), pixels, "val", 3)
    writer.close()
    config = (tmp_path / "projector_config.pbtxt").read_text()
    assert 'tensor_name: "val:00003"' in config and "sprite.png" in config
    run = tmp_path / "00003" / "val"
    assert (run / "metadata.tsv").read_text().split() == ["0", "1", "2", "1", "0"]
    with Image.open(run / "sprite.png") as sprite:
        # ceil(sqrt(5)) = 3 thumbnails per row, padded to a square.
        assert sprite.size == (24, 24)
        first = np.asarray(sprite.convert("RGB"))[:8, :8]
    np.testing.assert_allclose(first[..., 0], pixels[0, 0], atol=1)


def test_projector_rejects_a_sprite_tensorboard_cannot_load(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    with pytest.raises(ValueError, match="8192"):
        add_projector(
            writer, torch.randn(2, 4), None, np.zeros((2, 1, 4100, 4100), np.uint8), "x", 0
        )
    with pytest.raises(ValueError, match="square"):
        add_projector(writer, torch.randn(2, 4), None, _images(2, 3, 8, 6), "x", 0)
    writer.close()
