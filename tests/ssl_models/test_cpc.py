"""CPC for images: the data stage cuts the overlapping patch grid at exact positions (checked
on images whose pixels are their coordinates) and jitters each patch inside its square; the
context at row i never sees rows below i (exactly, in outputs and gradients, thanks to layer
norm in the encoder); the loss is InfoNCE over every patch of the batch (by hand and against
a loop); and a few dozen steps on real Fashion-MNIST find the patch rows below far above
chance."""

import math
import pickle

import pytest
import torch
from torch import nn

from ssl_models import build_backbone
from ssl_models.method import Batch
from ssl_models.methods.cpc import CPC
from ssl_models.transforms.patch_grid import patch_grid
from tests.ssl_models.helpers import tiny_backbone, validate_options

DEFAULTS = {
    "patch_size": 8,
    "patch_stride": 4,
    "patch_crop": 60 / 64,
    "greyscale": False,
    "prediction_steps": 5,
    "context_blocks": 5,
    "context_hidden_dim": 256,
    "encoder_norm": "layer",
}


def _make(images: torch.Tensor, seed: int = 0, **options) -> torch.Tensor:
    make = CPC.requirements(DEFAULTS | options).pretext
    columns = make([images], torch.Generator().manual_seed(seed))
    assert set(columns) == {"view_0"}
    return columns["view_0"]


def _tiny(**options) -> CPC:
    backbone, dim = tiny_backbone()
    return CPC(backbone, dim, context_hidden_dim=16, **options)


def _coordinate_images(n: int, side: int) -> torch.Tensor:
    """RGB images whose pixels say where they are: (row, column, image index)."""
    rows = torch.arange(side).view(side, 1).expand(side, side)
    cols = torch.arange(side).view(1, side).expand(side, side)
    images = [torch.stack([rows, cols, torch.full_like(rows, i)]) for i in range(n)]
    return torch.stack(images).to(torch.uint8)


@pytest.mark.parametrize(("side", "grid", "margin"), [(28, 6, 0), (32, 7, 0), (30, 6, 1)])
def test_the_grid_holds_every_patch_at_its_position_row_major(side, grid, margin):
    patches = _make(_coordinate_images(3, side), patch_crop=1.0)
    assert patches.shape == (3, grid * grid, 3, 8, 8) and patches.dtype == torch.uint8
    steps = torch.arange(8, dtype=torch.uint8).expand(8, 8)  # each row 0..7
    for b in range(3):
        for index in range(grid * grid):
            r, c = divmod(index, grid)  # row-major: patch r * grid + c
            y, x = margin + 4 * r, margin + 4 * c  # 8 px patches at a 4 px stride, centred
            assert torch.equal(patches[b, index, 0], y + steps.T)
            assert torch.equal(patches[b, index, 1], x + steps)
            assert (patches[b, index, 2] == b).all()


def test_the_papers_geometry_256_px_in_64_px_patches_at_stride_32_is_a_7x7_grid():
    y, x = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    patches = patch_grid(torch.stack([y, x]).unsqueeze(0), patch=64, stride=32)
    assert patches.shape == (1, 49, 2, 64, 64)
    corners = patches[0, :, :, 0, 0]  # (49, 2): top-left (y, x) of each patch
    expected = [[32.0 * (i // 7), 32.0 * (i % 7)] for i in range(49)]
    assert corners.tolist() == expected
    assert patches[0, 48, :, 63, 63].tolist() == [255.0, 255.0]  # the last ends at the edge


@pytest.mark.parametrize(("crop", "side"), [(60 / 64, 7), (0.75, 6)])
def test_each_patch_is_a_random_subcrop_padded_with_its_mean(crop, side):
    patches = _make(_coordinate_images(20, 28), patch_crop=crop)
    start = (8 - side) // 2
    inner = torch.zeros(8, 8, dtype=torch.bool)
    inner[start : start + side, start : start + side] = True
    steps = torch.arange(side, dtype=torch.uint8).expand(side, side)
    offsets = set()
    for b in range(20):
        for index in range(36):
            r, c = divmod(index, 6)
            patch = patches[b, index]
            crop_rows, crop_cols = (
                patch[0][inner].view(side, side),
                patch[1][inner].view(side, side),
            )
            oy, ox = crop_rows[0, 0].item() - 4 * r, crop_cols[0, 0].item() - 4 * c
            assert 0 <= oy <= 8 - side and 0 <= ox <= 8 - side  # a subcrop of this patch
            assert torch.equal(crop_rows, crop_rows[0, 0] + steps.T)
            assert torch.equal(crop_cols, crop_cols[0, 0] + steps)
            offsets.add((oy, ox))
            # The padding is the whole patch's mean: 4r + 3.5 rounds (half to even) to 4r + 4.
            assert (patch[0][~inner] == 4 * r + 4).all() and (patch[1][~inner] == 4 * c + 4).all()
            assert (patch[2] == b).all()
    assert offsets == {(y, x) for y in range(9 - side) for x in range(9 - side)}


def test_greyscale_converts_rgb_with_the_luma_weights_and_leaves_grey_images_alone():
    colours = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 50, 30]])
    images = colours.view(4, 3, 1, 1).expand(4, 3, 8, 8).to(torch.uint8)
    patches = _make(images, greyscale=True, patch_crop=1.0)  # one patch per image
    # 0.299 * 255 = 76.2, 0.587 * 255 = 149.7, 0.114 * 255 = 29.1, 3.0 + 29.4 + 3.4 = 35.8
    assert patches[:, 0, :, 0, 0].tolist() == [[76] * 3, [150] * 3, [29] * 3, [36] * 3]
    grey = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    assert torch.equal(_make(grey, greyscale=True), _make(grey))


@pytest.mark.parametrize("j", range(1, 6))
def test_the_context_never_sees_rows_below_exactly(j):
    model = _tiny()
    g = torch.Generator().manual_seed(j)
    patches = torch.randn(2, 36, 1, 8, 8, generator=g)
    changed = patches.clone()
    changed[0, 6 * j + 2] += torch.randn(1, 8, 8, generator=g)  # image 0, row j, column 2
    with torch.no_grad():
        before, after = (model.contexts(model.embed_patches(p)) for p in (patches, changed))
    assert torch.equal(after[:, :j], before[:, :j])  # the rows above: bit for bit
    assert torch.equal(after[1], before[1])  # layer norm: no other image moves either
    assert not torch.allclose(after[0, j], before[0, j])  # the patch's own row does
    # Gradients: the rows above row j read nothing from rows j and below.
    x = patches.clone().requires_grad_()
    model.contexts(model.embed_patches(x))[:, :j].sum().backward()
    grad = x.grad.view(2, 6, 6, -1).abs().sum(-1)
    assert (grad[:, j:] == 0).all()
    assert (grad[:, :j] > 0).all()


def test_the_context_looks_up_and_batch_norm_would_leak_across_patches():
    model = _tiny()
    x = torch.randn(2, 36, 1, 8, 8, requires_grad=True)
    model.contexts(model.embed_patches(x))[:, 5].sum().backward()  # the bottom row...
    assert (x.grad.view(2, 6, 6, -1)[:, 0].abs().sum(-1) > 0).all()  # ...sees the top row
    # With batch norm in training mode every patch moves every embedding (CPC v2's leak).
    leaky = _tiny(encoder_norm="batch")
    changed = x.detach().clone()
    changed[0, 35] += 1.0  # the bottom-right patch of image 0
    with torch.no_grad():
        before, after = (leaky.contexts(leaky.embed_patches(p)) for p in (x.detach(), changed))
    assert not torch.allclose(after[:, 0], before[:, 0])


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_layer_norm_replaces_every_batch_norm_of_the_encoder(name):
    torch.manual_seed(0)
    backbone, dim = build_backbone(name, width=0.125, in_channels=1)
    batch_norms = sum(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    model = CPC(backbone, dim, context_hidden_dim=8)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == batch_norms and all(m.num_groups == 1 for m in norms)
    patches = torch.randn(4, 8, 1, 8, 8)  # each patch's embedding is its own business
    together = model.backbone(patches.flatten(0, 1))
    alone = torch.cat([model.backbone(p) for p in patches.flatten(0, 1).split(1)])
    assert torch.allclose(together, alone, atol=1e-5)
    batch = build_backbone(name, width=0.125, in_channels=1)
    assert any(isinstance(m, nn.BatchNorm2d) for m in CPC(*batch, encoder_norm="batch").modules())


def _identity_context_model(dim: int, steps: int) -> CPC:
    """CPC on given embeddings: residual branches zeroed, so c = ReLU(z)."""
    model = CPC(nn.Identity(), dim, prediction_steps=steps, context_hidden_dim=4)
    for block in model.context[:-1]:
        nn.init.zeros_(block.expand.weight)
        nn.init.zeros_(block.expand.bias)
    return model


def test_info_nce_by_hand_on_a_tiny_batch():
    model = _identity_context_model(dim=2, steps=1)
    with torch.no_grad():
        model.predictors[0].weight.copy_(torch.eye(2))
        model.predictors[0].bias.zero_()
    # Two images, a 2x1 grid each; z rows are candidates 0..3 in (image, row) order.
    z = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]], [[[0.0, 1.0]], [[0.0, 3.0]]]])
    loss, accuracy = model.predictive_loss(z)
    # Image 0 predicts W c = [1, 0]: logits [1, 0, 0, 0], the positive is candidate 1.
    # Image 1 predicts [0, 1]: logits [0, 2, 1, 3], the positive, candidate 3, wins.
    l0 = -math.log(1 / (math.e + 3))
    l1 = -math.log(math.e**3 / (1 + math.e**2 + math.e + math.e**3))
    assert loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    assert accuracy.item() == 0.5


def test_info_nce_matches_a_loop_over_positions_steps_and_candidates():
    torch.manual_seed(0)
    model = _identity_context_model(dim=3, steps=2)
    for block in model.context[:-1]:  # a live context network this time
        nn.init.normal_(block.expand.weight, std=0.3)
    z = torch.randn(2, 4, 3, 3)  # N = 2, a 4x3 grid (any shape for the loss), D = 3
    loss, accuracy = model.predictive_loss(z)
    c = model.contexts(z)
    everything = z.reshape(-1, 3)
    expected, hits, count = 0.0, 0, 0
    for k, predictor in enumerate(model.predictors, start=1):
        terms = []
        for b in range(2):
            for i in range(4 - k):
                for j in range(3):
                    logits = everything @ predictor(c[b, i, j])
                    positive = (b * 4 + i + k) * 3 + j
                    terms.append(-torch.log_softmax(logits, 0)[positive])
                    hits += int(logits.argmax() == positive)
                    count += 1
        expected += sum(terms) / len(terms)  # the mean per step, summed over steps
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert accuracy.item() == pytest.approx(hits / count)


def test_each_worker_scores_its_rows_against_every_patch_of_the_global_batch(monkeypatch):
    """Two workers simulated in one process: worker r gathers the global batch (its own rows
    live) and labels its positives by their global index. The real gather's gradient
    convention is ``ssl_models.dist``'s, tested in test_dist.py."""
    import ssl_models.methods.cpc as cpc

    torch.manual_seed(0)
    model = CPC(nn.Identity(), 4, prediction_steps=2, context_blocks=2, context_hidden_dim=8)
    z = torch.randn(4, 3, 3, 4)  # the global batch: 4 images of 3x3 patches
    single_loss, single_accuracy = model.predictive_loss(z)
    losses, accuracies = [], []
    for worker in range(2):
        own = z[2 * worker : 2 * worker + 2]
        others = z.reshape(2, -1, 4)  # each worker's 18 patch embeddings, in rank order

        def gather(x, worker=worker, others=others):
            return torch.cat([x if r == worker else others[r] for r in range(2)])

        monkeypatch.setattr(cpc, "gather_with_grad", gather)
        monkeypatch.setattr(cpc, "rank", lambda worker=worker: worker)
        loss, accuracy = model.predictive_loss(own)
        losses.append(loss.item())
        accuracies.append(accuracy.item())
    # Equal shares: the mean of the workers' losses is the single-process loss.
    assert sum(losses) / 2 == pytest.approx(single_loss.item(), rel=1e-6)
    assert sum(accuracies) / 2 == pytest.approx(single_accuracy.item())
    assert losses[0] != pytest.approx(losses[1])  # each scored its own anchors


def test_one_step_on_rgb_reaches_encoder_context_and_predictors():
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18", width=0.125, in_channels=3)
    model = CPC(backbone, dim, context_hidden_dim=16)
    patches = _make(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))  # 7x7 grid
    assert patches.shape == (4, 49, 3, 8, 8)
    out = model(Batch([patches.float() / 255]))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert set(out.logs) == {"loss", "pretext_accuracy"}
    assert all(not v.requires_grad for v in out.logs.values())
    out.loss.backward()
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert any(p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    assert all(p.grad.abs().sum() > 0 for p in model.predictors.parameters())


def test_features_are_the_mean_patch_embedding_of_the_grid():
    model = _tiny().eval()
    images = torch.randn(3, 1, 28, 28)
    features = model.features(images)
    assert features.shape == (3, model.feature_dim)
    patches = torch.stack([images[:, :, 4 * r : 4 * r + 8, 4 * c : 4 * c + 8]
                           for r in range(6) for c in range(6)], dim=1)  # fmt: skip
    expected = model.backbone(patches.flatten(0, 1)).view(3, 36, -1).mean(1)
    assert torch.allclose(features, expected, atol=1e-5)


def test_the_data_stage_pickles_and_bad_inputs_are_refused():
    make = pickle.loads(pickle.dumps(CPC.requirements(DEFAULTS).pretext))
    assert make([torch.zeros(2, 1, 28, 28, dtype=torch.uint8)], torch.Generator())[
        "view_0"
    ].shape == (2, 36, 1, 8, 8)
    with pytest.raises(ValueError, match="square images"):
        make([torch.zeros(2, 1, 28, 32, dtype=torch.uint8)], torch.Generator())
    with pytest.raises(ValueError, match="do not fit"):
        _make(torch.zeros(2, 1, 6, 6, dtype=torch.uint8))
    for options, message in [
        ({"patch_stride": 9}, "patch_stride"),
        ({"patch_crop": 0.0}, "patch_crop"),
        ({"prediction_steps": 0}, "prediction_steps"),
        ({"encoder_norm": "group"}, "encoder_norm"),
    ]:
        with pytest.raises(ValueError, match=message):
            validate_options(CPC, **options)
    model = _tiny()
    with pytest.raises(ValueError, match=r"patches \(N, R \* C, ch, p, p\)"):
        model(Batch([torch.randn(2, 1, 28, 28)]))
    with pytest.raises(ValueError, match="square"):
        model(Batch([torch.randn(2, 35, 1, 8, 8)]))
    with pytest.raises(ValueError, match="5 rows ahead"):  # 16 px: a 3x3 grid
        model(Batch([_make(torch.zeros(2, 1, 16, 16, dtype=torch.uint8)).float()]))


def test_training_on_fashion_mnist_predicts_the_rows_below_far_above_chance(
    fmnist_small, one_thread
):
    from pipeline.data.ingest import ImageSpec, normalize, read_decoded

    pixels = torch.from_numpy(read_decoded(fmnist_small["train"], ImageSpec(28, 1), 1088).pixels)
    train, held_out = pixels[:1024], pixels[1024:]
    mean, std = torch.tensor([0.286]), torch.tensor([0.353])  # Fashion-MNIST's
    torch.manual_seed(0)
    backbone, dim = build_backbone("small_cnn", width=0.25, in_channels=1)
    model = CPC(backbone, dim, context_hidden_dim=64)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)  # the paper trains with Adam
    g = torch.Generator().manual_seed(0)
    make = CPC.requirements(DEFAULTS).pretext  # 6x6 grids of jittered 8 px patches, K = 5
    losses, accuracies = [], []
    for _ in range(60):
        patches = make([train[torch.randint(0, len(train), (32,), generator=g)]], g)["view_0"]
        out = model(Batch([normalize(patches, mean, std)]))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        accuracies.append(out.logs["pretext_accuracy"].item())
    # Chance: 5 ln(32 * 36) = 35.2 summed over the 5 steps; 28.4-29.2 over seeds at the end.
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5
    # Top-1 among the batch's 1152 patches: chance 0.09%, 1.3-1.9% after 60 steps.
    assert sum(accuracies[-5:]) / 5 > 10 / (32 * 36)
    model.eval()
    with torch.no_grad():
        out = model(Batch([normalize(make([held_out], g)["view_0"], mean, std)]))
    # 64 unseen images, 2304 candidates: chance 0.04%, 0.7-0.9% over seeds.
    assert out.logs["pretext_accuracy"].item() > 10 / (64 * 36)
