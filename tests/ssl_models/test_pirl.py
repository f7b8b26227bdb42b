"""PIRL: the jigsaw tiles of the data stage on hand-made images, both loss terms and the
memory-bank update by hand, gradients from both terms, DDP banks, and training on
Fashion-MNIST."""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ssl_models.methods.pirl as pirl_module
from ssl_models.method import Batch
from ssl_models.methods.pirl import PIRL
from ssl_models.patches import standardize_tiles
from ssl_models.transforms.image_and_tiles import JigsawTiles
from tests.ssl_models.helpers import tiny_backbone, validate_options


def _defaults() -> dict:
    """All of PIRL's options with their defaults: what the pipeline hands pretext_views."""
    params = inspect.signature(PIRL.__init__).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def test_tiles_are_jittered_grid_cells_in_a_random_order():
    # Every pixel of a 16 px image is unique (y * 16 + x), so each tile's top-left pixel
    # says where it was cut: cells are 5 px, tiles round(5 * 0.75) = 4 px.
    image = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    images = image.repeat(8, 1, 1, 1)
    first = torch.zeros(8, 1, 16, 16, dtype=torch.uint8)
    make = PIRL.requirements(_defaults()).pretext
    out = make([first, images], torch.Generator().manual_seed(0))
    assert set(out) == {"view_0", "view_1"} and out["view_0"] is first
    tiles = out["view_1"]
    assert tiles.shape == (8, 9, 1, 4, 4) and tiles.dtype == torch.uint8
    orders = []
    for per_image in tiles:
        cells = []
        for tile in per_image:
            y, x = divmod(int(tile[0, 0, 0]), 16)
            assert torch.equal(tile, image[0, :, y : y + 4, x : x + 4])  # a whole crop
            row, col = y // 5, x // 5
            assert y + 4 <= 5 * (row + 1) and x + 4 <= 5 * (col + 1)  # inside its cell
            cells.append(3 * row + col)
        assert sorted(cells) == list(range(9))  # every cell exactly once
        orders.append(tuple(cells))
    assert len(set(orders)) > 1  # the order is drawn per image


@pytest.mark.parametrize(("size", "tile"), [(28, 7), (32, 8), (64, 16), (224, 56)])
def test_tile_size_follows_the_image(size, tile):
    views = [torch.zeros(2, 3, size, size, dtype=torch.uint8)] * 2
    out = JigsawTiles(grid=3, tile_ratio=0.75, jitter=True)(views, torch.Generator())
    assert out["view_1"].shape == (2, 9, 3, tile, tile)


def test_each_tile_is_standardised_per_channel():
    tiles = torch.tensor([[0.0, 2.0], [4.0, 6.0]]).view(1, 1, 1, 2, 2).repeat(1, 2, 2, 1, 1)
    tiles[0, 1, 1] = 5.0  # a constant tile stays finite: all zeros
    out = standardize_tiles(tiles)
    expected = torch.tensor([[-3.0, -1.0], [1.0, 3.0]]) / math.sqrt(5)
    torch.testing.assert_close(out[0, 0, 0], expected)
    torch.testing.assert_close(out[0, 1, 1], torch.zeros(2, 2))


def test_tile_embedding_ignores_each_tiles_brightness_and_contrast():
    backbone, dim = tiny_backbone()
    model = PIRL(backbone, dim, 8, num_negatives=4).eval()
    tiles = torch.randn(2, 9, 1, 7, 7)
    scale, shift = torch.rand(2, 9, 1, 1, 1) + 0.5, torch.randn(2, 9, 1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(
            model.embed_tiles(tiles * scale + shift), model.embed_tiles(tiles), atol=1e-5, rtol=0
        )


def _hand_model(objective: str, loss_weight: float = 0.5, temperature: float = 0.5) -> PIRL:
    """Backbone = channel means; f = identity, each tile = identity, g = sum of the 4 tiles
    (grid 2); 2-d embeddings and a 4-entry bank set by hand."""
    backbone = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = PIRL(
        backbone,
        2,
        4,
        embedding_dim=2,
        temperature=temperature,
        num_negatives=3,
        loss_weight=loss_weight,
        objective=objective,
        grid=2,
        standardize=False,
    )
    with torch.no_grad():
        for linear in (model.image_head, model.tile_head, model.jigsaw_head):
            linear.bias.zero_()
        model.image_head.weight.copy_(torch.eye(2))
        model.tile_head.weight.copy_(torch.eye(2))
        model.jigsaw_head.weight.copy_(torch.eye(2).repeat(1, 4))
        model.bank.features.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]]))
    return model


def _hand_batch() -> tuple[list[Tensor], Tensor]:
    """Image 0: means (3, 4) -> f = (0.6, 0.8); its tiles sum to (4, 3) -> g = (0.8, 0.6).
    Image 1: means (0, 2) -> f = (0, 1); its tiles sum to (-1, 0) -> g = (-1, 0)."""
    image = torch.tensor([[3.0, 4.0], [0.0, 2.0]]).view(2, 2, 1, 1).expand(2, 2, 4, 4)
    tile_means = torch.tensor(
        [[[1.0, 0.0], [1.0, 1.0], [1.0, 2.0], [1.0, 0.0]], [[-1, 1], [0, -1], [0, 0], [0, 0]]]
    )
    return [image, tile_means.view(2, 4, 2, 1, 1).expand(2, 4, 2, 3, 3)], torch.tensor([3, 1])


def _expected_loss(objective: str, noise: list[int], loss_weight: float) -> float:
    bank = [(1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.6, 0.8)]
    f, g, own = [(0.6, 0.8), (0.0, 1.0)], [(0.8, 0.6), (-1.0, 0.0)], [3, 1]
    t, n, m = 0.5, 4, 3

    def dot(a, b):
        return a[0] * b[0] + a[1] * b[1]

    def scores(v, i):  # exp(s / t) for [own entry, noise entries]
        return [math.exp(dot(bank[j], v) / t) for j in [i, *noise]]

    rows = {
        "g": [scores(g[k], own[k]) for k in range(2)],
        "f": [scores(f[k], own[k]) for k in range(2)],
    }
    z = n * sum(sum(r) for term in rows.values() for r in term) / (4 * (1 + m))

    def term(name):
        total = 0.0
        for r in rows[name]:
            if objective == "softmax":
                total += -math.log(r[0] / sum(r))
            else:  # eq. 2-3: h = P / (P + m / n), P = exp(s / t) / Z
                h = [(s / z) / (s / z + m / n) for s in r]
                total += -math.log(h[0]) - sum(math.log(1 - x) for x in h[1:])
        return total / 2

    return loss_weight * term("g") + (1 - loss_weight) * term("f")


@pytest.mark.parametrize("objective", ["softmax", "nce"])
def test_loss_matches_hand_computation(objective):
    model = _hand_model(objective, loss_weight=0.3)
    views, indices = _hand_batch()
    torch.manual_seed(3)
    out = model(Batch(views, indices))
    torch.manual_seed(3)
    noise = torch.randint(0, 4, (3,)).tolist()  # the draw forward() makes after that seed
    expected = _expected_loss(objective, noise, loss_weight=0.3)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    # pretext_accuracy: g's own entry scores at least as high as every noise entry.
    bank = model.bank.features.new_tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])
    g = torch.tensor([[0.8, 0.6], [-1.0, 0.0]])
    hits = [(g[k] @ bank[i]) >= (bank[noise] @ g[k]).max() for k, i in enumerate([3, 1])]
    assert out.logs["pretext_accuracy"].item() == pytest.approx(sum(hits) / 2)
    if objective == "nce":
        assert model.normalizer.item() > 0


def test_bank_moves_towards_f_not_g():
    model = _hand_model("softmax")
    views, indices = _hand_batch()
    model(Batch(views, indices))
    bank = model.bank.features
    # m_3 = normalise(0.5 * (0.6, 0.8) + 0.5 * f_0) with f_0 = (0.6, 0.8); m_1 likewise.
    torch.testing.assert_close(bank[3], torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(bank[1], torch.tensor([0.0, 1.0]))
    model.bank.features[3] = torch.tensor([1.0, 0.0])
    model(Batch(views, indices))
    expected = F.normalize(torch.tensor([0.5 * 1.0 + 0.5 * 0.6, 0.5 * 0.8]), dim=0)
    torch.testing.assert_close(bank[3], expected)  # f's (0.6, 0.8), not g's (0.8, 0.6)
    torch.testing.assert_close(bank[[0, 2]], torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))


@pytest.mark.parametrize("loss_weight", [0.0, 1.0])
def test_gradient_reaches_the_backbone_from_each_term(loss_weight):
    backbone, dim = tiny_backbone()
    model = PIRL(backbone, dim, 16, num_negatives=8, loss_weight=loss_weight)
    views = [torch.randn(4, 1, 28, 28), torch.randn(4, 9, 1, 7, 7)]
    out = model(Batch(views, torch.arange(4)))
    assert set(out.logs) == {
        "loss",
        "loss_tiles",
        "loss_image",
        "pretext_accuracy",
        "positive_similarity",
    }
    assert all(not v.requires_grad for v in out.logs.values())
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.parameters())
    unused = model.jigsaw_head if loss_weight == 0 else model.image_head  # term weighted 0
    used = model.image_head if loss_weight == 0 else model.jigsaw_head
    assert all(p.grad.abs().sum() == 0 for p in unused.parameters())
    assert all(p.grad.abs().sum() > 0 for p in used.parameters())


def test_needs_indices_tiles_and_sound_options():
    backbone, dim = tiny_backbone()
    model = PIRL(backbone, dim, 8, num_negatives=4)
    with pytest.raises(ValueError, match="indices"):
        model(Batch([torch.randn(2, 1, 28, 28), torch.randn(2, 9, 1, 7, 7)]))
    with pytest.raises(ValueError, match="tiles"):
        model(Batch([torch.randn(2, 1, 28, 28), torch.randn(2, 1, 28, 28)], torch.arange(2)))
    with pytest.raises(ValueError, match="9 tiles"):
        model(Batch([torch.randn(2, 1, 28, 28), torch.randn(2, 4, 1, 7, 7)], torch.arange(2)))
    for bad in ({"objective": "nope"}, {"temperature": 0.0}, {"tile_ratio": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            validate_options(PIRL, **bad)


def test_bank_and_normaliser_survive_a_state_dict_round_trip():
    model, copy = _hand_model("nce"), _hand_model("nce")
    model(Batch(*_hand_batch()))
    copy.load_state_dict(model.state_dict())
    assert torch.equal(copy.bank.features, model.bank.features)
    assert torch.equal(copy.normalizer, model.normalizer)


def test_every_workers_bank_update_is_applied(monkeypatch):
    """Two workers, one image each: worker 0's bank and Z after receiving worker 1's
    messages (gathered indices, features and score means) equal one process's on both."""
    views, indices = _hand_batch()
    sent: list[Tensor] = []

    def record(x: Tensor) -> Tensor:  # worker 1: keep what it sends to the gather
        sent.append(x.clone())
        return x

    monkeypatch.setattr(pirl_module, "gather_no_grad", record)
    other = _hand_model("nce")
    torch.manual_seed(3)  # every worker draws the single process's noise entries
    other(Batch([v[1:] for v in views], indices[1:]))
    partner = iter(sent)
    monkeypatch.setattr(pirl_module, "gather_no_grad", lambda x: torch.cat([x, next(partner)]))
    worker = _hand_model("nce")
    torch.manual_seed(3)
    worker(Batch([v[:1] for v in views], indices[:1]))
    assert next(partner, None) is None  # every message was gathered
    monkeypatch.undo()
    one = _hand_model("nce")
    torch.manual_seed(3)
    one(Batch(views, indices))
    torch.testing.assert_close(worker.bank.features, one.bank.features)
    torch.testing.assert_close(worker.normalizer, one.normalizer)


def test_training_on_fashion_mnist_lowers_the_loss_and_finds_own_entries(fmnist_small):
    """The data stage's real augmentation, then the tiles; after 40 steps the tiles'
    embedding g picks its own image's bank entry among all 32 far above chance (1/32)."""
    from pipeline.data.ingest import ImageSpec, ViewPlan, normalize, read_decoded
    from ssl_models.transforms.views import ViewRecipe

    pixels = torch.from_numpy(read_decoded(fmnist_small["train"], ImageSpec(28, 1), 32).pixels)
    plan = ViewPlan(
        (ViewRecipe(28, crop_scale=(0.3, 1.0)),) * 2, PIRL.requirements(_defaults()).pretext
    )
    mean, std = pixels.float().mean().view(1) / 255, pixels.float().std().view(1) / 255
    backbone, dim = tiny_backbone()
    model = PIRL(backbone, dim, 32, num_negatives=64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen, everyone = torch.Generator().manual_seed(0), torch.arange(32)

    def views() -> list[Tensor]:
        columns = plan(pixels, gen)
        return [normalize(columns[f"view_{i}"], mean, std) for i in range(2)]

    losses = []
    for _ in range(40):
        out = model(Batch(views(), everyone))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5

    hits_g = hits_f = 0.0
    with torch.no_grad():
        for _ in range(3):  # three fresh draws of views and tiles
            image, tiles = views()
            g = F.normalize(model.embed_tiles(tiles), dim=1)
            f = F.normalize(model.image_head(model.backbone(image)), dim=1)
            hits_g += ((g @ model.bank.features.T).argmax(1) == everyone).float().mean().item()
            hits_f += ((f @ model.bank.features.T).argmax(1) == everyone).float().mean().item()
    assert hits_g / 3 > 2 / 32 and hits_f / 3 > 4 / 32
