"""Few-label fine-tuning: exact class-balanced subsets, and a tiny task a small CNN learns."""

import numpy as np
import pytest
import torch

from pipeline.data.ingest import channel_stats
from pipeline.eval.finetune import balanced_subset, finetune_accuracy
from ssl_models.backbones import build_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


def test_subset_is_exactly_class_balanced():
    labels = np.array([2, 0, 1, 1, 0, 1, 1, 0, 2, 1, 0, 1, 1, 1])  # 4 x 0, 8 x 1, 2 x 2
    rows = balanced_subset(labels, 0.5, seed=0)
    assert np.array_equal(rows, np.sort(rows)) and len(np.unique(rows)) == len(rows)
    assert np.bincount(labels[rows]).tolist() == [2, 4, 1]


@pytest.mark.parametrize(("fraction", "per_class"), [(0.01, 1), (0.1, 10), (0.001, 1), (1.0, 100)])
def test_one_and_ten_percent_of_ten_classes(fraction, per_class):
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 100))
    rows = balanced_subset(labels, fraction, seed=0)
    assert np.bincount(labels[rows], minlength=10).tolist() == [per_class] * 10


def test_subset_depends_on_the_seed_only():
    labels = np.repeat(np.arange(10), 100)
    first = balanced_subset(labels, 0.1, seed=1)
    assert np.array_equal(first, balanced_subset(labels, 0.1, seed=1))
    assert not np.array_equal(first, balanced_subset(labels, 0.1, seed=2))


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan")])
def test_fraction_outside_the_unit_interval_raises(fraction):
    with pytest.raises(ValueError, match=r"fraction must lie in \(0, 1\]"):
        balanced_subset(np.arange(10) % 2, fraction, seed=0)


def test_unlabelled_rows_raise():
    with pytest.raises(ValueError, match="labels has 1 unlabelled"):
        balanced_subset(np.array([0, 1, -1]), 0.5, seed=0)


def bright_and_dark(count: int, bright_label: int, rng: np.random.Generator):
    """12x12 grey images: class ``bright_label`` in [150, 255], the other in [0, 105]."""
    labels = np.arange(count) % 2
    low = np.where(labels == bright_label, 150, 0).reshape(-1, 1, 1, 1)
    return (low + rng.integers(0, 106, (count, 1, 12, 12))).astype(np.uint8), labels


@pytest.mark.parametrize("bright_label", [0, 1])
def test_small_cnn_learns_brightness_and_the_callers_backbone_is_untouched(bright_label):
    rng = np.random.default_rng(bright_label)
    train_pixels, train_labels = bright_and_dark(64, bright_label, rng)
    test_pixels, test_labels = bright_and_dark(64, bright_label, rng)
    mean, std = channel_stats(train_pixels)
    torch.manual_seed(0)
    backbone, dim = build_backbone("small_cnn", width=0.25, in_channels=1)
    before = {name: value.clone() for name, value in backbone.state_dict().items()}
    acc = finetune_accuracy(
        backbone, dim, train_pixels, train_labels, test_pixels, test_labels, mean, std,
        epochs=3, batch_size=16, lr=0.05,
    )  # fmt: skip
    # Both label assignments are learned, so the score is not a lucky initial head.
    assert acc["top1"] > 0.9 and acc["top5"] == 1.0
    after = backbone.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_bad_images_raise_naming_the_split():
    pixels, labels = bright_and_dark(4, 0, np.random.default_rng(0))
    backbone, dim = build_backbone("small_cnn", width=0.25, in_channels=1)

    def run(train_pixels, train_labels, test_pixels):
        finetune_accuracy(
            backbone, dim, train_pixels, train_labels, test_pixels, labels, [0.5], [0.25]
        )

    with pytest.raises(ValueError, match="train_pixels must be square uint8"):
        run(pixels.astype(np.float32), labels, pixels)
    with pytest.raises(ValueError, match="train_pixels is empty"):
        run(pixels[:0], labels[:0], pixels)
    with pytest.raises(ValueError, match="train_labels must be one label >= 0 per image"):
        run(pixels, labels[:3], pixels)
    with pytest.raises(ValueError, match="test_pixels must be square uint8"):
        run(pixels, labels, pixels[:, :, :6])
    with pytest.raises(ValueError, match="test_pixels are"):
        run(pixels, labels, np.zeros((4, 3, 12, 12), np.uint8))
