"""Jigsaw: Algorithm 1's permutation set (against a line-by-line transcription and brute
force), the data stage's tile order (position j holds cell perm[j], checked on images whose
pixels are their coordinates), the shortcut defences, the late-fusion classifier, and a few
dozen steps on real Fashion-MNIST solving puzzles of unseen images far above chance."""

import itertools
import math
import pickle

import numpy as np
import pytest
import torch

from ssl_models import SSLMethod, build_backbone
from ssl_models.method import Batch
from ssl_models.methods.jigsaw import Jigsaw
from ssl_models.patches import grid_tiles, standardize_tiles
from ssl_models.transforms.jigsaw import (
    ShuffledTiles,
    lexicographic_permutations,
    maximal_hamming_permutations,
)
from tests.ssl_models.helpers import tiny_backbone, validate_options


def _hamming(perms: torch.Tensor) -> torch.Tensor:
    """Pairwise Hamming distances, off-diagonal entries only, flattened."""
    d = (perms[:, None] != perms[None]).sum(-1)
    return d[~torch.eye(len(perms), dtype=torch.bool)]


def _algorithm_1(size: int, seed: int, items: int) -> list[tuple[int, ...]]:
    """The paper's Algorithm 1 read literally (as the reference select_permutations.py):
    remove the chosen one from the candidates, pick the candidate with the largest summed
    Hamming distance to the chosen set, the first one on ties."""
    remaining = list(itertools.permutations(range(items)))
    j = int(np.random.default_rng(seed).integers(len(remaining)))
    chosen: list[tuple[int, ...]] = []
    while True:
        chosen.append(remaining.pop(j))
        if len(chosen) == size:
            return chosen
        sums = [
            sum(sum(a != b for a, b in zip(p, q, strict=True)) for q in chosen) for p in remaining
        ]
        j = sums.index(max(sums))


def _transform(perms: int = 10, **options) -> ShuffledTiles:
    return ShuffledTiles(num_permutations=perms, **options)


def _coordinates(n: int, size: int, channel: str) -> torch.Tensor:
    """uint8 RGB images whose every channel holds the pixel's row ("y") or column ("x")."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    plane = y if channel == "y" else x
    return plane.to(torch.uint8).expand(n, 3, size, size).contiguous()


def _tiny(num_permutations: int = 10, **options) -> Jigsaw:
    backbone, dim = tiny_backbone()
    options = {"tile_dim": 16, "hidden_dim": 32, **options}
    return Jigsaw(backbone, dim, num_permutations=num_permutations, **options)


def _inputs(images: torch.Tensor, transform: ShuffledTiles, seed: int = 0):
    columns = transform([images], torch.Generator().manual_seed(seed))
    return [columns["view_0"].float() / 255], {"permutation": columns["target_permutation"]}


def test_permutation_set_is_algorithm_1():
    assert np.array_equal(lexicographic_permutations(6), list(itertools.permutations(range(6))))
    for items, size, seed in [(4, 24, 0), (5, 30, 1), (6, 40, 2)]:
        expected = _algorithm_1(size, seed, items)
        assert maximal_hamming_permutations(size, seed, items).tolist() == list(map(list, expected))


def test_minimal_distance_against_brute_force_on_a_tiny_case():
    # All subsets of the 4! permutations of 4 tiles: the best minimal Hamming distance is 4
    # (every position differs) up to 4 permutations, then 3 (5 cannot all differ everywhere:
    # pigeonhole per position). The greedy summed distance (Algorithm 1) reaches 4 while its
    # choices form a Latin square, then trades the minimum for the average: 2.
    perms = np.array(list(itertools.permutations(range(4))))
    distances = (perms[:, None] != perms[None]).sum(-1)
    for size, optimum, greedy in [(2, 4, 4), (3, 4, 4), (4, 4, 4), (5, 3, 2), (6, 3, 2)]:
        subsets = np.array(list(itertools.combinations(range(24), size)))
        within = distances[subsets[:, :, None], subsets[:, None, :]] + 99 * np.eye(size, dtype=int)
        assert within.min(axis=(1, 2)).max() == optimum
        assert _hamming(maximal_hamming_permutations(size, 3, 4)).min().item() == greedy


def test_the_first_nine_of_nine_tiles_form_a_latin_square():
    perms = maximal_hamming_permutations(9, seed=5)
    assert _hamming(perms).min().item() == 9  # every pair differs in every position
    for column in perms.T:
        assert sorted(column.tolist()) == list(range(9))


def test_sets_of_100_and_1000_have_no_duplicates_and_the_expected_distances():
    for size, mean in [(100, 8.08), (1000, 8.008)]:
        perms = maximal_hamming_permutations(size)
        assert perms.shape == (size, 9) and perms.dtype == torch.int64
        assert len({tuple(p) for p in perms.tolist()}) == size
        assert all(sorted(p) == list(range(9)) for p in perms.tolist())
        distances = _hamming(perms).float()
        assert distances.mean().item() == pytest.approx(mean, abs=5e-4)
        assert distances.min().item() == 2  # the summed-distance greedy trades the minimum
        # The smaller set is the larger one's start: the greedy is the same until then.
        assert torch.equal(maximal_hamming_permutations(1000)[:size], perms)


def test_permutation_set_is_seeded_and_cached_safely():
    a = maximal_hamming_permutations(20, seed=1)
    assert torch.equal(a, maximal_hamming_permutations(20, seed=1))
    assert not torch.equal(a[0], maximal_hamming_permutations(20, seed=2)[0])
    a[0] = 0  # the caller's copy, not the cache
    assert maximal_hamming_permutations(20, seed=1)[0].tolist() != [0] * 9
    with pytest.raises(ValueError, match="cannot choose"):
        maximal_hamming_permutations(25, items=4)


def test_position_j_of_the_view_is_cell_perm_j():
    n, size = 32, 28  # 9 px cells, 8 px tiles (64/75 of a cell)
    transform = _transform(10, grayscale_prob=0.0)
    views, targets = {}, {}
    for channel in "yx":  # same seed, same draws: one run per coordinate
        columns = transform([_coordinates(n, size, channel)], torch.Generator().manual_seed(7))
        views[channel], targets[channel] = columns["view_0"], columns["target_permutation"]
    assert torch.equal(targets["y"], targets["x"])
    labels = targets["y"]
    assert views["y"].shape == (n, 9, 3, 8, 8) and views["y"].dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() < 10
    perms = maximal_hamming_permutations(10)
    steps = torch.arange(8)
    for i in range(n):
        for j, cell in enumerate(perms[labels[i]].tolist()):
            row, col = divmod(cell, 3)
            y0, x0 = views["y"][i, j, 0, 0, 0].item(), views["x"][i, j, 0, 0, 0].item()
            assert 9 * row <= y0 <= 9 * row + 1 and 9 * col <= x0 <= 9 * col + 1  # jitter 0..1
            assert torch.equal(views["y"][i, j, 0], (y0 + steps)[:, None].expand(8, 8))
            assert torch.equal(views["x"][i, j, 0], (x0 + steps)[None, :].expand(8, 8))
    # The same by replaying the generator: the tiles of grid_tiles, reordered by perm.
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    g = torch.Generator().manual_seed(3)
    tiles = grid_tiles(images, 3, 8, g)
    expected_labels = torch.randint(0, 10, (n,), generator=g)
    columns = transform([images], torch.Generator().manual_seed(3))
    assert torch.equal(columns["target_permutation"], expected_labels)
    for i in range(n):
        order = perms[expected_labels[i]]
        assert torch.equal(columns["view_0"][i], tiles[i, order])


def test_labels_cover_the_set_uniformly_and_replay_with_the_seed():
    images = torch.zeros(3000, 1, 28, 28, dtype=torch.uint8)
    a = _transform(10)([images], torch.Generator().manual_seed(0))["target_permutation"]
    b = _transform(10)([images], torch.Generator().manual_seed(0))["target_permutation"]
    assert torch.equal(a, b)
    counts = torch.bincount(a, minlength=10)
    assert counts.min() > 240 and counts.max() < 360  # 300 expected each


def test_colour_channels_of_each_tile_are_shifted_inside_their_cell():
    n, size = 64, 64  # 21 px cells, 18 px tiles, channels shifted by up to 2/64 * 18 = 1 px
    transform = _transform(10, grayscale_prob=0.0)
    views = {
        c: transform([_coordinates(n, size, c)], torch.Generator().manual_seed(1))["view_0"]
        for c in "yx"
    }
    assert views["y"].shape == (n, 9, 3, 18, 18)
    y0, x0 = views["y"][..., 0, 0].long(), views["x"][..., 0, 0].long()  # (N, 9, 3)
    for corner in (y0, x0):
        spread = corner.amax(-1) - corner.amin(-1)  # between the channels of one tile
        assert spread.max() == 2 and (spread > 0).float().mean() > 0.5
        lo = corner - corner % 21  # the cell's start (images have no border: 3 * 21 = 63)
        assert torch.all(corner - lo + 18 <= 21)
        assert torch.all(lo == (corner.amin(-1, keepdim=True) // 21) * 21)  # one cell per tile
    # Grayscale images keep their channels aligned; 28 px images have tiles too small to shift.
    gray = _transform(10, grayscale_prob=1.0)
    aligned = gray([_coordinates(n, size, "y")], torch.Generator().manual_seed(1))["view_0"]
    assert torch.equal(aligned, aligned[:, :, :1].expand_as(aligned))
    small = transform([_coordinates(n, 28, "y")], torch.Generator())["view_0"]
    assert torch.equal(small, small[:, :, :1].expand_as(small))


def test_grayscale_replaces_colour_with_luma_at_the_given_rate():
    images = torch.tensor([100, 50, 10], dtype=torch.uint8).view(1, 3, 1, 1).expand(4000, 3, 28, 28)
    out = _transform(10, grayscale_prob=0.3)([images], torch.Generator().manual_seed(0))["view_0"]
    luma = round(0.299 * 100 + 0.587 * 50 + 0.114 * 10)  # 60
    gray = (out == luma).flatten(1).all(1)
    assert torch.all(gray | (out == images[:, None, :, :8, :8]).flatten(1).all(1))
    assert 0.27 < gray.float().mean() < 0.33
    never = _transform(10, grayscale_prob=0.0)([images], torch.Generator())["view_0"]
    assert torch.equal(never, images[:, None, :, :8, :8].expand_as(never))


def test_each_tile_and_channel_is_standardised_on_its_own():
    tiles = torch.randn(2, 9, 3, 8, 8) * 5 + 3
    tiles[0, 4, 1] = 7.0  # a flat tile channel: no division by zero
    out = standardize_tiles(tiles)
    assert torch.allclose(out.mean((-2, -1)), torch.zeros(2, 9, 3), atol=1e-5)
    std = out.std(dim=(-2, -1), correction=0)
    assert torch.allclose(std[std > 0], torch.ones(2 * 27 - 1))
    assert torch.equal(out[0, 4, 1], torch.zeros(8, 8))
    # So brightness and contrast of a tile (or the loop's dataset normalisation) tell nothing.
    model = _tiny().eval()
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    views, targets = _inputs(images, _transform(10))
    scale, shift = torch.rand(4, 9, 1, 1, 1) + 0.5, torch.randn(4, 9, 1, 1, 1)
    with torch.no_grad():
        a = model.classifier(
            model.tile_head(model.backbone(standardize_tiles(views[0]).flatten(0, 1))).view(4, -1)
        )
        b = model(Batch([views[0] * scale + shift], targets=targets))
        c = model(Batch(views, targets=targets))
    assert torch.allclose(b.loss, c.loss, atol=1e-5)
    assert torch.allclose(c.loss, torch.nn.functional.cross_entropy(a, targets["permutation"]))


def test_tiles_share_the_encoder_and_are_concatenated_in_view_order():
    model = _tiny().eval()
    tiles = torch.randn(3, 9, 1, 8, 8)
    calls: list[int] = []
    model.backbone.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    with torch.no_grad():
        out = model(Batch([tiles], targets={"permutation": torch.tensor([0, 1, 2])}))
        per_tile = [
            model.tile_head(model.backbone(standardize_tiles(tiles[:, j]))) for j in range(9)
        ]
        logits = model.classifier(torch.cat(per_tile, dim=1))
    assert calls[0] == 27  # one pass over all N * 9 tiles
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2]))
    assert torch.allclose(out.loss, expected, atol=1e-5)
    # Late fusion keeps the positions: swapping two tiles changes the prediction.
    swapped = tiles[:, [1, 0, 2, 3, 4, 5, 6, 7, 8]]
    with torch.no_grad():
        moved = model(Batch([swapped], targets={"permutation": torch.tensor([0, 1, 2])}))
    assert not torch.allclose(moved.loss, out.loss)


def test_one_step_has_finite_loss_logs_and_backbone_gradients():
    model = _tiny(num_permutations=100)
    assert (
        isinstance(model, SSLMethod)
        and Jigsaw.requirements(Jigsaw.option_defaults()).global_views == 1
    )
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    views, targets = _inputs(images, _transform(100))
    out = model(Batch(views, targets=targets))
    assert set(out.logs) == {"loss", "pretext_accuracy"}
    assert all(not v.requires_grad for v in out.logs.values())
    assert out.loss.item() == pytest.approx(math.log(100), rel=0.1)  # chance at the start
    out.loss.backward()
    grads = [p.grad for p in model.backbone.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)


def test_rgb_32_and_64_px_images_with_other_backbones():
    for name, size, tile in [("small_cnn", 32, 9), ("resnet18", 64, 18)]:
        torch.manual_seed(0)
        backbone, dim = build_backbone(name, width=0.125, in_channels=3)
        model = Jigsaw(backbone, dim, num_permutations=100, tile_dim=8, hidden_dim=16)
        images = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8)
        views, targets = _inputs(images, _transform(100))
        assert views[0].shape == (4, 9, 3, tile, tile)
        assert torch.isfinite(model(Batch(views, targets=targets)).loss)
    # A ViT needs tiles a multiple of its patch size: tile_size sets them.
    backbone, dim = build_backbone("vit_tiny", width=0.25, in_channels=3, small_images=True)
    model = Jigsaw(backbone, dim, num_permutations=100, tile_size=8, tile_dim=8, hidden_dim=16)
    views, targets = _inputs(
        torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), _transform(100, tile_size=8)
    )
    assert views[0].shape == (2, 9, 3, 8, 8)
    assert torch.isfinite(model(Batch(views, targets=targets)).loss)


def test_pretext_views_follow_the_options_and_pickle():
    defaults = Jigsaw.option_defaults()
    assert defaults["num_permutations"] == 1000 and defaults["grayscale_prob"] == 0.3
    make = Jigsaw.requirements(defaults | {"num_permutations": 100, "permutation_seed": 4}).pretext
    assert isinstance(make, ShuffledTiles)
    assert (make.num_permutations, make.permutation_seed) == (100, 4)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    again = pickle.loads(pickle.dumps(make))
    a = make([images], torch.Generator().manual_seed(0))
    b = again([images], torch.Generator().manual_seed(0))
    assert set(a) == {"view_0", "target_permutation"}
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rejects_bad_options_and_inputs():
    for bad in [
        {"num_permutations": 1},
        {"tile_size": -1},
        {"grayscale_prob": 1.5},
        {"channel_jitter": 0.5},
        {"dropout": 1.0},
    ]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            validate_options(Jigsaw, **bad)
    model = _tiny()
    with pytest.raises(ValueError, match=r"\(N, 9, C, t, t\)"):
        model(Batch([torch.randn(2, 1, 28, 28)], targets={"permutation": torch.zeros(2)}))
    with pytest.raises(ValueError, match="no target"):
        model(Batch([torch.randn(2, 9, 1, 8, 8)]))


def test_training_on_fashion_mnist_solves_puzzles_of_unseen_images(fmnist_small):
    from pipeline.data.ingest import ImageSpec, read_decoded

    pixels = torch.from_numpy(read_decoded(fmnist_small["train"], ImageSpec(28, 1), 1024).pixels)
    train, held_out = pixels[:768], pixels[768:]
    transform = _transform(10)  # 10 permutations: chance is 0.1

    torch.manual_seed(0)
    backbone, dim = build_backbone("small_cnn", width=0.25, in_channels=1)
    model = Jigsaw(backbone, dim, num_permutations=10, tile_dim=64, hidden_dim=128)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    accuracies = []
    for step in range(40):
        batch = train[torch.randint(0, len(train), (32,), generator=g)]
        views, targets = _inputs(batch, transform, seed=step)
        out = model(Batch(views, targets=targets))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        accuracies.append(out.logs["pretext_accuracy"].item())
    assert sum(accuracies[:5]) / 5 < 0.3
    assert sum(accuracies[-5:]) / 5 > 0.5
    model.eval()
    with torch.no_grad():
        views, targets = _inputs(held_out, transform, seed=100)
        out = model(Batch(views, targets=targets))
    assert out.logs["pretext_accuracy"].item() > 0.5
