"""Online probe: captures the step's first backbone call (or embeds the first view), learns
without touching the encoder's gradients, skips unlabelled rows, and round-trips through a
checkpoint."""

import pytest
import torch
from torch import nn

from pipeline.train.monitors import OnlineProbe

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(classes: int = 3, dim: int = 8) -> tuple[nn.Module, OnlineProbe]:
    torch.manual_seed(0)
    backbone = nn.Linear(dim, dim)
    return backbone, OnlineProbe(backbone, dim, classes, lr=0.5)


def test_only_the_armed_steps_first_backbone_call_is_captured():
    backbone, probe = _setup()
    backbone(torch.randn(4, 8))  # an evaluation call, not armed
    assert probe.features is None
    probe.arm()
    first = backbone(torch.randn(4, 8))
    backbone(torch.randn(4, 8))  # e.g. the second view: ignored
    torch.testing.assert_close(probe.features, first.detach())
    assert not probe.features.requires_grad


def test_learns_separable_classes_without_touching_the_encoder():
    backbone, probe = _setup()
    centres = torch.randn(3, 8) * 4
    for _ in range(60):
        labels = torch.randint(0, 3, (32,))
        probe.arm()
        backbone(centres[labels] + torch.randn(32, 8) * 0.3)
        probe.step(labels)
    assert probe.epoch_accuracy() > 0.9
    assert all(p.grad is None for p in backbone.parameters())


def test_unlabelled_rows_are_neither_trained_on_nor_counted():
    backbone, probe = _setup()
    head_before = [p.clone() for p in probe.head.parameters()]
    probe.arm()
    backbone(torch.randn(6, 8))
    probe.step(torch.full((6,), -1))
    assert probe.epoch_accuracy() is None  # no labelled row seen
    for before, after in zip(head_before, probe.head.parameters(), strict=True):
        torch.testing.assert_close(before, after)  # zero loss: momentum SGD does not move
    probe.arm()
    backbone(torch.randn(4, 8))
    probe.step(torch.tensor([0, -1, 2, -1]))
    assert probe.seen.item() == 2  # only the labelled rows count
    assert probe.epoch_accuracy() is not None and probe.seen.item() == 0  # reset per epoch


def test_state_round_trips():
    _, probe = _setup()
    backbone2, restored = _setup()
    with torch.no_grad():
        for p in probe.head.parameters():
            p.add_(1.0)
    restored.load_state_dict(probe.state_dict())
    for a, b in zip(
        probe.head.state_dict().values(), restored.head.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b)


def test_a_method_that_skips_the_backbones_forward_gets_the_images_embedded():
    backbone, probe = _setup()
    images = torch.randn(4, 8)
    probe.arm()  # e.g. MAE: the encoder ran on visible patch tokens, not through forward
    probe.step(torch.tensor([0, 1, 2, 0]), images)
    assert probe.seen.item() == 4
    assert all(p.grad is None for p in backbone.parameters())  # embedded without gradient


def test_a_step_without_a_forward_is_an_error():
    _, probe = _setup()
    probe.arm()
    with pytest.raises(RuntimeError, match="did not run"):
        probe.step(torch.tensor([0]))
