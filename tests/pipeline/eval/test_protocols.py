"""Protocol settings and the fine-tuning validation split (no Ray: a stand-in context)."""

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.eval.protocols import ProtocolSettings, label_subsets, validation_ids


def _context(per_class: int = 50, classes: int = 4, seed: int = 3) -> SimpleNamespace:
    labels = np.repeat(np.arange(classes), per_class)
    ids = [f"img{i:04d}" for i in range(len(labels))]
    return SimpleNamespace(
        train_ids_labels=(ids, labels), config=SimpleNamespace(run=SimpleNamespace(seed=seed))
    )


def test_validation_split_is_balanced_seeded_and_outside_every_label_subset():
    context = _context()
    subsets = label_subsets(context, (0.1, 0.2))
    val = validation_ids(context, subsets, 0.5)
    ids, labels = context.train_ids_labels
    label_of = dict(zip(ids, labels, strict=True))
    taken = set(subsets["finetune_10pct"]) | set(subsets["finetune_20pct"])
    assert not taken & set(val) and len(set(val)) == len(val)
    # Each class keeps half of what the subsets left of its 50 images.
    left = Counter(label_of[i] for i in ids if i not in taken)
    assert Counter(label_of[i] for i in val) == {c: round(0.5 * n) for c, n in left.items()}
    assert validation_ids(context, subsets, 0.5) == val
    assert validation_ids(_context(seed=4), subsets, 0.5) != val


def test_subsets_using_the_whole_train_split_leave_no_validation_split():
    context = _context()
    with pytest.raises(ValueError, match="no validation split is left"):
        validation_ids(context, label_subsets(context, (1.0,)), 0.1)


def test_settings_grid_and_start():
    settings = ProtocolSettings(finetune_lrs=(0.01, 0.1), finetune_weight_decays=(0.0, 1e-4))
    assert settings.finetune_grid() == [(0.01, 0.0), (0.01, 1e-4), (0.1, 0.0), (0.1, 1e-4)]
    assert ProtocolSettings().finetune_grid() == [(0.05, 0.0)]
    with pytest.raises(ValueError, match="finetune_from must be one of"):
        ProtocolSettings(finetune_from="projector")
