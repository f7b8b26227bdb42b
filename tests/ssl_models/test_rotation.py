"""RotNet: the data stage shows every image in all four counter-clockwise rotations labelled
0..3 (checked on hand-made images), the loss is the 4-way cross-entropy (hand-computed), and a
few dozen steps on real Fashion-MNIST push rotation accuracy far above chance."""

import math
import pickle

import pytest
import torch
from torch import nn

from ssl_models import SSLMethod, build_backbone
from ssl_models.method import Batch, MethodOutput
from ssl_models.methods.rotation import RotNet
from ssl_models.transforms.rotations import RotatedCopies
from tests.ssl_models.helpers import assert_state_round_trips, tiny_backbone, validate_options


def _make(images: torch.Tensor) -> dict[str, torch.Tensor]:
    return RotNet.requirements({"classifier_hidden_dim": 0}).pretext([images], torch.Generator())


def _inputs(images: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """uint8 images -> what forward gets: float copies (unnormalised) and the labels."""
    columns = _make(images)
    return [columns["view_0"].float()], {"rotation": columns["target_rotation"]}


def _tiny(**options) -> RotNet:
    backbone, dim = tiny_backbone()
    return RotNet(backbone, dim, **options)


def test_each_copy_is_rotated_counter_clockwise_by_its_label_times_90_degrees():
    digits = torch.arange(1, 10, dtype=torch.uint8).view(3, 3)  # no symmetry at all
    images = torch.stack([torch.stack([digits, 10 * digits]), torch.stack([digits.T, digits])])
    columns = _make(images)  # two images, two channels
    assert set(columns) == {"view_0", "target_rotation"}
    copies, labels = columns["view_0"], columns["target_rotation"]
    assert copies.shape == (2, 4, 2, 3, 3) and copies.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.tolist() == [[0, 1, 2, 3]] * 2
    by_hand = [
        [[1, 2, 3], [4, 5, 6], [7, 8, 9]],  # label 0: as is
        [[3, 6, 9], [2, 5, 8], [1, 4, 7]],  # label 1: 90 degrees counter-clockwise
        [[9, 8, 7], [6, 5, 4], [3, 2, 1]],  # label 2: 180 degrees
        [[7, 4, 1], [8, 5, 2], [9, 6, 3]],  # label 3: 270 counter-clockwise = 90 clockwise
    ]
    for y, expected in enumerate(by_hand):
        expected = torch.tensor(expected, dtype=torch.uint8)
        assert torch.equal(copies[0, y, 0], expected)
        assert torch.equal(copies[0, y, 1], 10 * expected)  # channels turn together
        assert torch.equal(copies[1, y, 1], expected)  # each image its own copies
        assert torch.equal(copies[1, y, 0], torch.rot90(digits.T, y))


def test_a_corner_marker_walks_counter_clockwise_round_the_corners():
    image = torch.zeros(1, 1, 6, 6, dtype=torch.uint8)
    image[0, 0, 0, 0] = 255  # top-left
    copies = _make(image)["view_0"][0, :, 0]
    corners = [tuple(c.nonzero()[0].tolist()) for c in copies]
    assert corners == [(0, 0), (5, 0), (5, 5), (0, 5)]  # top-left, bottom-left, ...


def test_the_training_loops_normalisation_is_per_channel_on_every_copy():
    from pipeline.data.ingest import normalize

    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    copies = _make(images)["view_0"]
    mean, std = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.2, 0.3, 0.4])
    normalised = normalize(copies, mean, std)
    for y in range(4):
        assert torch.allclose(normalised[:, y], normalize(copies[:, y], mean, std))


def test_data_stage_transform_pickles_ignores_the_generator_and_needs_square_images():
    make = RotNet.requirements({"classifier_hidden_dim": 0}).pretext
    assert isinstance(make, RotatedCopies)
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    a = pickle.loads(pickle.dumps(make))([images], torch.Generator().manual_seed(1))
    b = make([images], torch.Generator().manual_seed(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="square"):
        make([torch.zeros(2, 1, 4, 6, dtype=torch.uint8)], torch.Generator())


def test_loss_is_the_four_way_cross_entropy_computed_by_hand():
    # Backbone: the 2x2 image's pixels. A marker at the top-left sits, in copy y, at pixel
    # [0, 2, 3, 1][y] (row-major); the classifier scores that pixel as rotation y.
    model = RotNet(nn.Flatten(), 4)
    image = torch.tensor([[[[1, 0], [0, 0]]]], dtype=torch.uint8).repeat(3, 1, 1, 1)
    views, targets = _inputs(image)
    s = 2.0
    with torch.no_grad():
        model.classifier.bias.zero_()
        model.classifier.weight.zero_()
        for y, pixel in enumerate([0, 2, 3, 1]):
            model.classifier.weight[y, pixel] = s
    out = model(Batch(views, targets=targets))
    # Every copy: logit s for its own rotation, 0 for the other three.
    assert out.loss.item() == pytest.approx(math.log(1 + 3 * math.exp(-s)), rel=1e-6)
    assert out.logs["pretext_accuracy"].item() == 1.0
    # Scoring each copy as the next rotation: the same margin, all wrong.
    with torch.no_grad():
        model.classifier.weight.copy_(model.classifier.weight.roll(1, dims=0))
    out = model(Batch(views, targets=targets))
    assert out.loss.item() == pytest.approx(math.log(3 + math.exp(s)), rel=1e-6)
    assert out.logs["pretext_accuracy"].item() == 0.0


def test_a_zero_classifier_gives_log_4_and_chance_accuracy():
    model = _tiny()
    nn.init.zeros_(model.classifier.weight)
    nn.init.zeros_(model.classifier.bias)
    views, targets = _inputs(torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8))
    out = model(Batch(views, targets=targets))
    assert out.loss.item() == pytest.approx(math.log(4), rel=1e-6)
    assert out.logs["pretext_accuracy"].item() == 0.25  # ties go to 0: the unrotated quarter


def test_one_backbone_pass_whose_first_rows_are_the_unrotated_images_in_order():
    model = _tiny().eval()
    seen: list[torch.Tensor] = []
    model.backbone.register_forward_hook(lambda _m, args, _o: seen.append(args[0]))
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    views, targets = _inputs(images)
    model(Batch(views, targets=targets))
    assert len(seen) == 1 and seen[0].shape == (12, 1, 28, 28)
    for y in range(4):  # rotation-major: the online probe reads rows 0..N-1 with the labels
        assert torch.equal(seen[0][3 * y : 3 * y + 3], torch.rot90(images, y, (-2, -1)).float())


def test_one_step_has_finite_loss_logs_and_gradients_for_both_heads():
    for hidden in (0, 16):
        model = _tiny(classifier_hidden_dim=hidden)
        assert (
            isinstance(model, SSLMethod)
            and RotNet.requirements(RotNet.option_defaults()).global_views == 1
        )
        views, targets = _inputs(torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8))
        out = model(Batch(views, targets=targets))
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
        assert set(out.logs) == {"loss", "pretext_accuracy"}
        assert all(not v.requires_grad for v in out.logs.values())
        out.loss.backward()
        for p in model.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()
        assert any(p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_rejects_bad_inputs_and_options():
    model = _tiny()
    views, targets = _inputs(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="no target 'rotation'"):
        model(Batch(views))
    with pytest.raises(ValueError, match=r"\(N, 4, C, H, W\)"):
        model(Batch([views[0][:, 0]], targets=targets))
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        model(Batch(views, targets={"rotation": targets["rotation"][:1]}))
    with pytest.raises(ValueError, match="classifier_hidden_dim"):
        validate_options(RotNet, classifier_hidden_dim=-1)


def test_state_round_trips():
    views, targets = _inputs(torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8))

    class WithTargets(RotNet):  # the helper calls model(Batch(views))
        def forward(self, batch: Batch) -> MethodOutput:
            return super().forward(Batch(batch.views, targets=targets))

    backbone, dim = tiny_backbone(0)
    model = WithTargets(backbone, dim, classifier_hidden_dim=8)
    backbone, dim = tiny_backbone(1)
    assert_state_round_trips(model, WithTargets(backbone, dim, classifier_hidden_dim=8), views)


def test_training_on_fashion_mnist_recognises_rotations_of_unseen_images(fmnist_small):
    from pipeline.data.ingest import ImageSpec, read_decoded

    pixels = torch.from_numpy(read_decoded(fmnist_small["train"], ImageSpec(28, 1), 640).pixels)
    train, held_out = pixels[:512], pixels[512:]

    def normalised(images: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        views, targets = _inputs(images)
        return [(views[0] / 255 - 0.29) / 0.35], targets  # about Fashion-MNIST's mean, std

    torch.manual_seed(0)
    backbone, dim = build_backbone("small_cnn", width=0.25, in_channels=1)
    model = RotNet(backbone, dim)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    accuracies = []
    for _ in range(40):
        views, targets = normalised(train[torch.randint(0, len(train), (32,), generator=g)])
        out = model(Batch(views, targets=targets))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        accuracies.append(out.logs["pretext_accuracy"].item())
    assert sum(accuracies[:5]) / 5 < 0.45  # starts near chance, 0.25
    assert sum(accuracies[-5:]) / 5 > 0.6
    # 128 unseen images, with batch statistics as in training: after 40 steps the running
    # averages still lag the fast-moving weights.
    views, targets = normalised(held_out)
    with torch.no_grad():
        out = model(Batch(views, targets=targets))
    assert out.logs["pretext_accuracy"].item() > 0.6
