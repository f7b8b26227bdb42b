"""Linear probe: separable features, random labels, standardisation, bad input, seeding."""

import pytest
import torch

from pipeline.eval.linear_probe import linear_probe_accuracy, train_linear_probe

NUM_CLASSES = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def clusters(labels: torch.Tensor, gen: torch.Generator, dim: int = 32) -> torch.Tensor:
    """One tight cluster per class around 3 * (one-hot of the class)."""
    return torch.eye(NUM_CLASSES, dim)[labels] * 3 + 0.3 * torch.randn(
        len(labels), dim, generator=gen
    )


def test_separable_features_reach_full_accuracy():
    gen = torch.Generator().manual_seed(0)
    train_labels, test_labels = torch.arange(300) % NUM_CLASSES, torch.arange(100) % NUM_CLASSES
    acc = linear_probe_accuracy(
        clusters(train_labels, gen),
        train_labels,
        clusters(test_labels, gen),
        test_labels,
        epochs=20,
    )
    # top-5 of 4 classes counts every class, so it is 1 whatever the probe learned.
    assert acc == {"top1": 1.0, "top5": 1.0, "train_top1": 1.0}


def test_random_labels_stay_at_chance_on_the_test_split():
    gen = torch.Generator().manual_seed(1)
    train_labels = torch.randint(0, NUM_CLASSES, (300,), generator=gen)
    test_labels = torch.randint(0, NUM_CLASSES, (2000,), generator=gen)
    train = clusters(torch.arange(300) % NUM_CLASSES, gen)
    test = clusters(torch.arange(2000) % NUM_CLASSES, gen)
    acc = linear_probe_accuracy(train, train_labels, test, test_labels, epochs=20)
    # Chance is 0.25; the binomial std over 2000 test points is about 0.01.
    assert abs(acc["top1"] - 1 / NUM_CLASSES) < 0.05
    # The probe can only memorise label noise, so it fits the train split better.
    assert acc["train_top1"] > acc["top1"] + 0.1


def test_standardisation_makes_the_probe_blind_to_feature_scale_and_offset():
    gen = torch.Generator().manual_seed(2)
    labels = torch.arange(200) % NUM_CLASSES
    features = clusters(labels, gen)
    probe = train_linear_probe(features, labels, NUM_CLASSES, epochs=5)
    scaled = train_linear_probe(features * 1000 + 50, labels, NUM_CLASSES, epochs=5)
    # The returned layer takes raw features: the standardisation is folded into it.
    torch.testing.assert_close(scaled.weight * 1000, probe.weight, rtol=1e-3, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(
            scaled(features * 1000 + 50), probe(features), rtol=1e-3, atol=1e-3
        )


def test_same_seed_gives_identical_weights_and_another_seed_does_not():
    gen = torch.Generator().manual_seed(3)
    labels = torch.arange(100) % NUM_CLASSES
    features = clusters(labels, gen)
    runs = [
        train_linear_probe(features, labels, NUM_CLASSES, epochs=3, batch_size=16, seed=s)
        for s in (7, 7, 8)
    ]
    assert torch.equal(runs[0].weight, runs[1].weight) and torch.equal(runs[0].bias, runs[1].bias)
    assert not torch.equal(runs[0].weight, runs[2].weight)


@pytest.mark.parametrize(
    ("features", "labels", "message"),
    [
        (torch.zeros(5, 3), torch.zeros(4, dtype=torch.long), "train_labels must be one label"),
        (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), "train_features is empty"),
        (torch.zeros(5), torch.zeros(5, dtype=torch.long), r"train_features must be \(N, D\)"),
        (torch.zeros(2, 3), torch.tensor([0, 4]), r"train_labels must lie in \[0, 4\)"),
        (torch.zeros(2, 3), torch.tensor([-1, 0]), r"train_labels must lie in \[0, 4\)"),
        (torch.zeros(2, 3), torch.tensor([0.0, 1.0]), "train_labels must be integers"),
    ],
)
def test_bad_train_split_raises_naming_it(features, labels, message):
    with pytest.raises(ValueError, match=message):
        train_linear_probe(features, labels, NUM_CLASSES)


def test_bad_test_split_raises_naming_it():
    train, labels = torch.randn(8, 3), torch.arange(8) % 2
    with pytest.raises(ValueError, match="test_labels must be one label"):
        linear_probe_accuracy(train, labels, torch.randn(4, 3), labels)
    with pytest.raises(ValueError, match="test_features have 5 dimensions, train_features 3"):
        linear_probe_accuracy(train, labels, torch.randn(8, 5), labels)
    with pytest.raises(ValueError, match="test_features is empty"):
        linear_probe_accuracy(train, labels, torch.randn(0, 3), labels[:0])


def _written(features: torch.Tensor, labels: torch.Tensor, out, rows_per_group: int):
    """Features as the embedding job writes them: Parquet row groups of {id, embedding, label}."""
    import numpy as np
    import pyarrow as pa

    from pipeline.eval.features import write_features

    def tables():
        for start in range(0, len(features), 50):  # batches as Ray Data would deliver them
            part = features[start : start + 50].numpy().astype(np.float32)
            yield pa.table(
                {
                    "id": [f"r{i}" for i in range(start, start + len(part))],
                    "embedding": pa.FixedSizeListArray.from_arrays(part.reshape(-1), part.shape[1]),
                    "label": pa.array(labels[start : start + 50].numpy(), pa.int64()),
                }
            )

    return write_features(tables(), str(out), row_group_rows=rows_per_group)


def test_streamed_probe_matches_the_in_memory_probe_holding_a_fraction(tmp_path):
    from pipeline.eval.linear_probe import linear_probe_accuracy_streamed

    gen = torch.Generator().manual_seed(4)
    train_labels = torch.randint(0, NUM_CLASSES, (1200,), generator=gen)
    test_labels = torch.randint(0, NUM_CLASSES, (400,), generator=gen)
    # Overlapping clusters, so accuracy is neither 1 nor chance.
    train = torch.eye(NUM_CLASSES, 32)[train_labels] + 0.6 * torch.randn(1200, 32, generator=gen)
    test = torch.eye(NUM_CLASSES, 32)[test_labels] + 0.6 * torch.randn(400, 32, generator=gen)
    train, test = train * 20 + 3, test * 20 + 3  # standardisation must undo scale and offset
    settings = {"epochs": 8, "batch_size": 64, "seed": 0}
    in_memory = linear_probe_accuracy(train, train_labels, test, test_labels, **settings)
    train_split = _written(train, train_labels, tmp_path / "train", rows_per_group=100)
    test_split = _written(test, test_labels, tmp_path / "test", rows_per_group=100)
    assert train_split.rows == 1200 and train_split.dim == 32
    streamed = linear_probe_accuracy_streamed(
        train_split, test_split, NUM_CLASSES, shuffle_buffer=200, **settings
    )
    assert 0.5 < in_memory["top1"] < 0.99
    for key in ("top1", "top5", "train_top1"):
        assert abs(streamed[key] - in_memory[key]) < 0.03, (key, streamed, in_memory)
    # The driver held a shuffle buffer and a row group or two, never the split.
    assert train_split.peak_rows <= 200 + 2 * 100 < train_split.rows


def test_streamed_batches_deliver_every_row_once_in_a_seeded_order(tmp_path):
    features = torch.arange(700, dtype=torch.float32).view(-1, 1).repeat(1, 3)
    split = _written(features, torch.zeros(700, dtype=torch.int64), tmp_path, rows_per_group=64)

    def rows(seed):
        gen = torch.Generator().manual_seed(seed)
        batches = list(split.batches(32, gen=gen, shuffle_buffer=128))
        assert all(len(b[0]) == 32 for b in batches[:-1])
        return torch.cat([b[0][:, 0] for b in batches]).long().tolist()

    first = rows(0)
    assert sorted(first) == list(range(700)) and first != list(range(700))
    assert rows(0) == first and rows(1) != first
    assert torch.cat([b[0] for b in split.batches(100)])[:, 0].long().tolist() == list(range(700))
    assert split.ids_at([0, 65, 699]) == {0: "r0", 65: "r65", 699: "r699"}
