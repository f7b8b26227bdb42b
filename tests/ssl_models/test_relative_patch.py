"""Context prediction: the data stage cuts a centre patch and one neighbour and labels the
neighbour's position exactly (checked on images whose pixels are their coordinates), with
the paper's gap, jitter, pixelation and colour tricks; each patch is normalised on its own,
the loss is the 8-way cross-entropy (hand-computed), and a few dozen steps on real
Fashion-MNIST push position accuracy far above chance."""

import inspect
import math
import pickle

import pytest
import torch

from ssl_models import build_backbone
from ssl_models.method import Batch
from ssl_models.methods.relative_patch import RelativePatch
from ssl_models.patches import normalise_patches
from ssl_models.transforms.neighbour_pairs import (
    drop_colours,
    patch_geometry,
    pixelate,
    project_colours,
)
from tests.ssl_models.helpers import tiny_backbone, validate_options

DEFAULTS = {
    "gap_ratio": 0.5,
    "jitter_ratio": 7 / 96,
    "pixelate_prob": 0.33,
    "colour": "projection",
    "hidden_dim": 512,
}
# Label -> (row, column) step from the centre: row-major, the centre itself skipped.
STEPS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def _make(images: torch.Tensor, seed: int = 0, **options) -> dict[str, torch.Tensor]:
    make = RelativePatch.requirements(DEFAULTS | options).pretext
    return make([images], torch.Generator().manual_seed(seed))


def _tiny(hidden_dim: int = 16, **options) -> RelativePatch:
    backbone, dim = tiny_backbone()
    return RelativePatch(backbone, dim, hidden_dim=hidden_dim, **options)


def _coordinate_images(n: int, side: int) -> torch.Tensor:
    """RGB images whose pixels say where they are: (row, column, image index)."""
    rows = torch.arange(side).view(side, 1).expand(side, side)
    cols = torch.arange(side).view(1, side).expand(side, side)
    images = [torch.stack([rows, cols, torch.full_like(rows, i)]) for i in range(n)]
    return torch.stack(images).to(torch.uint8)


@pytest.mark.parametrize(
    ("side", "tile", "starts"),
    [  # top-left corners per grid row (column): cell start, + 0..2 px jitter; 32 px: 1 px margin
        (28, 6, [[0, 1, 2], [9, 10, 11], [18, 19, 20]]),
        (32, 7, [[1, 2, 3], [11, 12, 13], [21, 22, 23]]),
    ],
)
def test_the_label_is_the_neighbours_position_around_the_centre(side, tile, starts):
    n = 400
    columns = _make(_coordinate_images(n, side), pixelate_prob=0.0, colour="none")
    assert set(columns) == {"view_0", "target_position"}
    pairs, labels = columns["view_0"], columns["target_position"]
    assert pairs.shape == (n, 2, 3, tile, tile) and pairs.dtype == torch.uint8
    assert labels.shape == (n,) and labels.dtype == torch.int64
    assert sorted(labels.unique().tolist()) == list(range(8))
    cell_of = {start: r for r, row in enumerate(starts) for start in row}  # pixel -> grid row
    seen_jitter = set()
    ramp = torch.arange(tile, dtype=torch.uint8).expand(tile, tile)  # each row 0..tile-1
    for i in range(n):
        (y0, x0), (y1, x1) = corners = [pairs[i, k, :2, 0, 0].tolist() for k in range(2)]
        for k, (y, x) in enumerate(corners):  # unresized crops of image i
            assert torch.equal(pairs[i, k, 0], y + ramp.T)  # rows count down
            assert torch.equal(pairs[i, k, 1], x + ramp)  # columns across
            assert (pairs[i, k, 2] == i % 256).all()
        assert y0 in starts[1] and x0 in starts[1]  # the first patch is the centre's
        step = cell_of[y1] - 1, cell_of[x1] - 1
        assert step == STEPS[labels[i]]
        seen_jitter |= {y0 - starts[1][0], x1 - starts[step[1] + 1][0]}
        # The gap: neighbouring tiles never touch (at least cell - tile - 2 * jitter = 1 px).
        if step[0]:
            assert abs(y1 - y0) - tile >= 1
        if step[1]:
            assert abs(x1 - x0) - tile >= 1
    assert seen_jitter == {0, 1, 2}


def test_patch_geometry_keeps_the_papers_ratios_at_every_size():
    assert patch_geometry(432, 0.5, 7 / 96) == (96, 7)  # the paper: 96 px, gap 48, +-7 px
    assert patch_geometry(28, 0.5, 7 / 96) == (6, 1)  # 9 px cells: gap 3, jitter at least 1
    assert patch_geometry(32, 0.5, 7 / 96) == (7, 1)
    assert patch_geometry(224, 0.5, 7 / 96) == (49, 4)
    assert patch_geometry(28, 0.5, 0.0) == (6, 0)
    with pytest.raises(ValueError, match="no room"):
        patch_geometry(8, 0.5, 7 / 96)  # 2 px cells


def test_projection_removes_the_green_magenta_axis_by_hand():
    colours = torch.tensor(
        [[0, 255, 0], [255, 0, 255], [255, 0, 0], [200, 200, 200], [10, 50, 30]],
        dtype=torch.uint8,
    ).view(5, 3, 1, 1)
    # (I - a a^T / 6) p with a = [-1, 2, -1], then 0.75 (x - 127.5) + 127.5, rounded:
    # green -> grey 85 -> 95.6; magenta -> grey 170 -> 159.4; red -> (212.5, 85, -42.5) ->
    # (191.25, 95.6, 0); grey stays grey (200 -> 181.9); (10, 50, 30) -> (20, 30, 40) ->
    # (46.9, 54.4, 61.9).
    expected = [[96] * 3, [159] * 3, [191, 96, 0], [182] * 3, [47, 54, 62]]
    assert project_colours(colours).view(5, 3).tolist() == expected
    patches = torch.randint(0, 256, (50, 3, 5, 5), dtype=torch.uint8)
    r, g, b = project_colours(patches).long().unbind(1)
    assert (2 * g - r - b).abs().max() <= 2  # zero up to rounding


def test_colour_dropping_keeps_one_channel_and_fills_the_others_with_faint_noise():
    g = torch.Generator().manual_seed(0)
    stripes = torch.tensor([30, 230], dtype=torch.uint8).repeat(8)[:15]  # std 100, far from 128
    patches = stripes.view(1, 1, 1, 15).expand(300, 3, 15, 15).contiguous()
    dropped = drop_colours(patches, g)
    same = (dropped == patches).flatten(2).all(2)  # (300, 3): which channel was kept
    assert same.sum(1).tolist() == [1] * 300
    assert same.sum(0).min() > 70  # each channel kept about a third of the time
    noise = dropped[~same].float()  # the 600 dropped channels
    std = patches[0, 0].float().std(correction=0).item()  # ~100: noise std ~1
    assert (noise - 128).abs().max() <= 6
    assert noise.std().item() == pytest.approx(std / 100, rel=0.15)


def test_grayscale_images_are_only_cut_not_recoloured():
    images = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    plain = _make(images, colour="none")
    for colour in ("projection", "drop"):
        other = _make(images, colour=colour)
        assert all(torch.equal(plain[k], other[k]) for k in plain)


def test_pixelation_resamples_about_the_chosen_share_of_patches():
    g = torch.Generator().manual_seed(0)
    patches = torch.randint(0, 256, (3000, 1, 12, 12), dtype=torch.uint8)
    assert torch.equal(pixelate(patches, 0.0, g), patches)
    coarse = pixelate(patches, 1.0, g)
    assert (coarse != patches).flatten(1).any(1).all()
    # Down to 2-10 px and back up smooths white noise: much less variance per patch.
    assert coarse.float().var() < 0.6 * patches.float().var()
    changed = (pixelate(patches, 0.33, g) != patches).flatten(1).any(1).float().mean().item()
    assert changed == pytest.approx(0.33, abs=0.04)


def test_each_patch_is_normalised_on_its_own():
    x = torch.randn(4, 2, 3, 7, 7) * 5 + 3
    y = normalise_patches(x)
    assert torch.allclose(y.mean(dim=(-2, -1)), torch.zeros(4, 2, 3), atol=1e-5)
    assert torch.allclose(y.square().mean(dim=(-3, -2, -1)), torch.ones(4, 2), atol=1e-4)
    assert torch.equal(
        normalise_patches(torch.full((1, 1, 1, 4, 4), 7.0)), torch.zeros(1, 1, 1, 4, 4)
    )
    # So the model cannot tell patches apart by brightness or contrast: a per-patch,
    # per-channel offset and a per-patch scale leave the loss as it was.
    columns = _make(torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8))
    views, targets = [columns["view_0"].float()], {"position": columns["target_position"]}
    model = _tiny()
    scale, offset = torch.rand(8, 2, 1, 1, 1) + 0.5, 100 * torch.randn(8, 2, 1, 1, 1)
    assert model(Batch([scale * views[0] + offset], targets=targets)).loss.item() == pytest.approx(
        model(Batch(views, targets=targets)).loss.item(), rel=1e-4
    )


def test_loss_is_the_8_way_cross_entropy_by_hand():
    model = _tiny()
    fc9 = model.classifier[-1]
    with torch.no_grad():
        fc9.weight.zero_()
        fc9.bias.copy_(torch.tensor([2.0, 0, 0, 0, 0, 0, 0, 0]))
    views = [torch.randn(4, 2, 1, 6, 6)]
    out = model(Batch(views, targets={"position": torch.tensor([0, 0, 3, 7])}))
    # softmax: e^2 / (e^2 + 7) for class 0, 1 / (e^2 + 7) for the others; argmax is class 0.
    z = math.e**2 + 7
    expected = (2 * -math.log(math.e**2 / z) + 2 * -math.log(1 / z)) / 4
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.logs["pretext_accuracy"].item() == 0.5


def test_one_step_reaches_the_backbone_and_both_patches():
    columns = _make(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8))
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18", width=0.125, in_channels=3)
    model = RelativePatch(backbone, dim, hidden_dim=16)
    views = [columns["view_0"].float().requires_grad_()]
    out = model(Batch(views, targets={"position": columns["target_position"]}))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert set(out.logs) == {"loss", "pretext_accuracy"}
    assert all(not v.requires_grad for v in out.logs.values())
    out.loss.backward()
    for p in [*model.backbone.parameters(), *model.fc6.parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert views[0].grad[:, 0].abs().sum() > 0 and views[0].grad[:, 1].abs().sum() > 0


def test_the_data_stage_pickles_and_options_are_checked():
    signature = inspect.signature(RelativePatch.__init__).parameters.values()
    assert {p.name: p.default for p in signature if p.kind is p.KEYWORD_ONLY} == DEFAULTS
    assert RelativePatch.requirements(
        RelativePatch.option_defaults()
    ).global_views == 1 and RelativePatch.requirements(
        RelativePatch.option_defaults()
    ).backbone_kinds == ("cnn",)
    make = pickle.loads(pickle.dumps(RelativePatch.requirements(DEFAULTS).pretext))
    columns = make([torch.zeros(2, 1, 28, 28, dtype=torch.uint8)], torch.Generator())
    assert columns["view_0"].shape == (2, 2, 1, 6, 6)
    with pytest.raises(ValueError, match="jitter must not close the gap"):
        validate_options(RelativePatch, gap_ratio=0.1, jitter_ratio=0.1)
    with pytest.raises(ValueError, match="pixelate_prob"):
        validate_options(RelativePatch, pixelate_prob=1.5)
    with pytest.raises(ValueError, match="colour"):
        validate_options(RelativePatch, colour="gray")
    with pytest.raises(ValueError, match="no target"):
        _tiny()(Batch([torch.randn(2, 2, 1, 6, 6)]))
    with pytest.raises(ValueError, match=r"\(N, 2, C, t, t\)"):
        _tiny()(Batch([torch.randn(2, 1, 28, 28)], targets={"position": torch.zeros(2)}))


def test_training_on_fashion_mnist_finds_the_neighbours_of_unseen_images(fmnist_small):
    from pipeline.data.ingest import ImageSpec, read_decoded

    pixels = torch.from_numpy(read_decoded(fmnist_small["train"], ImageSpec(28, 1), 2048).pixels)
    train, held_out = pixels[:1024], pixels[1024:]
    torch.manual_seed(0)
    backbone, dim = build_backbone("small_cnn", width=0.25, in_channels=1)
    model = RelativePatch(backbone, dim, hidden_dim=128)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    make = RelativePatch.requirements(DEFAULTS).pretext  # 6 px patches, pixelation: the real task
    losses = []
    for _ in range(50):
        columns = make([train[torch.randint(0, len(train), (128,), generator=g)]], g)
        out = model(
            Batch([columns["view_0"].float()], targets={"position": columns["target_position"]})
        )
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert sum(losses[-5:]) / 5 < 0.85 * math.log(8)  # from chance's ln 8 = 2.08
    model.eval()
    columns = make([held_out], g)
    with torch.no_grad():
        out = model(
            Batch([columns["view_0"].float()], targets={"position": columns["target_position"]})
        )
    # Chance is 1/8; 0.35-0.41 over seeds. Blank background patches cap it on Fashion-MNIST.
    assert out.logs["pretext_accuracy"].item() > 0.3
