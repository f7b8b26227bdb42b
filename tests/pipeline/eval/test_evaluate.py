"""Weighted kNN: hand-computed votes, perfect and chance-level features."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.eval.evaluate import KNNReport, KNNRow, knn_accuracy, knn_predict, raw_pixel_features


def test_votes_are_similarity_weighted_by_temperature():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [math.sqrt(0.5), math.sqrt(0.5)]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    scores = knn_predict(bank, labels, query, num_classes=2, k=3, temperature=0.5)
    expected_class0 = math.exp(1.0 / 0.5)
    expected_class1 = math.exp(0.0 / 0.5) + math.exp(math.sqrt(0.5) / 0.5)
    torch.testing.assert_close(scores[0], torch.tensor([expected_class0, expected_class1]))


def test_only_k_nearest_vote():
    bank = F.normalize(torch.tensor([[1.0, 0.1], [1.0, 0.2], [0.0, 1.0], [0.1, 1.0]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    query = F.normalize(torch.tensor([[1.0, 0.0]]), dim=1)
    scores = knn_predict(bank, labels, query, num_classes=2, k=2, temperature=0.1)
    assert scores[0, 1] == 0 and scores[0, 0] > 0


def test_separable_features_score_one_and_random_features_score_chance():
    gen = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(10, 64, generator=gen), dim=1)
    bank_labels = torch.arange(2000) % 10
    query_labels = torch.arange(500) % 10
    bank = F.normalize(centres[bank_labels] + 0.05 * torch.randn(2000, 64, generator=gen), dim=1)
    queries = F.normalize(centres[query_labels] + 0.05 * torch.randn(500, 64, generator=gen), dim=1)
    assert knn_accuracy(bank, bank_labels, queries, query_labels, 20, 0.1)["top1"] == 1.0
    noise = F.normalize(torch.randn(2000, 64, generator=gen), dim=1)
    noise_queries = F.normalize(torch.randn(500, 64, generator=gen), dim=1)
    acc = knn_accuracy(noise, bank_labels, noise_queries, query_labels, 20, 0.1)
    assert abs(acc["top1"] - 0.1) < 0.05
    assert acc["top5"] > acc["top1"]


def test_raw_pixel_features_are_unit_norm():
    pixels = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8).numpy()
    norms = raw_pixel_features(pixels).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(5))


def test_table_lists_every_row():
    rows = [KNNRow("ssl", 0.8, 0.99, 0.4), KNNRow("raw pixels", 0.7, 0.95, 0.3)]
    table = KNNReport(rows, 200, 0.1, "t").table()
    assert "0.8000" in table and "raw pixels" in table and "k=200" in table


@pytest.mark.parametrize("k", [1, 5])
def test_k_larger_than_bank_is_clamped(k):
    bank = F.normalize(torch.randn(3, 4), dim=1)
    scores = knn_predict(bank, torch.tensor([0, 1, 2]), bank, 3, k=k * 10, temperature=0.1)
    assert scores.shape == (3, 3)


def test_feature_spread_detects_collapse():
    from pipeline.eval.evaluate import feature_spread

    gen = torch.Generator().manual_seed(0)
    spread_out = torch.randn(2000, 64, generator=gen)
    collapsed = torch.ones(2000, 64) + 1e-4 * torch.randn(2000, 64, generator=gen)
    assert abs(feature_spread(spread_out) - 1.0) < 0.05
    assert feature_spread(collapsed) < 0.01


def _random_bank(rows: int, dim: int, classes: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(rows, dim, generator=gen), dim=1)
    return features, torch.randint(0, classes, (rows,), generator=gen)


@pytest.mark.parametrize(("k", "chunk"), [(200, 97), (5, 1000), (50, 13), (300, 64)])
def test_chunked_knn_equals_the_in_memory_knn(k, chunk):
    from pipeline.eval.knn import RunningTopK, streamed_knn_accuracy, streamed_knn_scores

    bank, bank_labels = _random_bank(1000, 16, 7, seed=0)
    queries, query_labels = _random_bank(150, 16, 7, seed=1)
    chunks = [(bank[s : s + chunk], bank_labels[s : s + chunk]) for s in range(0, 1000, chunk)]
    expected = knn_predict(bank, bank_labels, queries, 7, k=k, temperature=0.1)
    streamed = streamed_knn_scores(chunks, queries, k=k, temperature=0.1, query_block=40)
    torch.testing.assert_close(streamed, expected, rtol=1e-4, atol=1e-5)
    assert streamed_knn_accuracy(chunks, queries, query_labels, k, 0.1) == knn_accuracy(
        bank, bank_labels, queries, query_labels, k, 0.1
    )
    # Ties-insensitive: the k best similarities are the same multiset, whichever tied row won.
    top = RunningTopK(queries, min(k, 1000), query_block=40)
    for features, _ in chunks:
        top.update(features, torch.zeros(len(features), dtype=torch.int64))
    reference = (queries @ bank.T).topk(min(k, 1000), dim=1).values
    torch.testing.assert_close(top.similarities, reference, rtol=1e-5, atol=1e-6)


def test_chunked_knn_with_duplicate_rows_scores_like_the_in_memory_knn():
    from pipeline.eval.knn import streamed_knn_scores

    # Every bank row twice with the same label: exact ties, whose order must not matter.
    bank, labels = _random_bank(200, 8, 4, seed=2)
    bank, labels = torch.cat([bank, bank]), torch.cat([labels, labels])
    queries, _ = _random_bank(30, 8, 4, seed=3)
    chunks = [(bank[s : s + 33], labels[s : s + 33]) for s in range(0, 400, 33)]
    expected = knn_predict(bank, labels, queries, 4, k=20, temperature=0.1)
    torch.testing.assert_close(streamed_knn_scores(chunks, queries, k=20), expected)


def test_streamed_knn_refuses_an_unlabelled_or_empty_bank():
    from pipeline.eval.knn import streamed_knn_scores

    queries, _ = _random_bank(3, 4, 2, seed=0)
    with pytest.raises(ValueError, match="unlabelled"):
        streamed_knn_scores([(queries, torch.tensor([0, -1, 1]))], queries)
    with pytest.raises(ValueError, match="empty"):
        streamed_knn_scores([], queries)


def test_requested_encoders_share_one_pass_per_split(monkeypatch):
    from pipeline.eval.evaluate import EvalContext
    from pipeline.eval.features import FeatureSplit

    passes = []

    def embed(self, split, shard_dir, encoders):
        passes.append((split, list(encoders)))
        for encoder in encoders:
            self._features[(encoder, shard_dir)] = FeatureSplit([], 0, 1, column=encoder)

    monkeypatch.setattr(EvalContext, "_embed", embed)
    context = EvalContext(None, None, {}, "ckpt", "/data/train", "/data/test", "test")
    context.request(["trained", "raw_pixels"])
    assert passes == []  # requesting runs nothing
    assert context.features("raw_pixels", "test").column == "raw_pixels"
    assert context.features_for("test", ["trained"])["trained"].column == "trained"
    context.features_for("train", ["trained", "random_init"])
    context.features("random_init", "test")  # not requested: a pass of its own
    assert passes == [
        ("test", ["raw_pixels", "trained"]),
        ("train", ["trained", "random_init", "raw_pixels"]),
        ("test", ["random_init"]),
    ]
    with pytest.raises(ValueError, match="encoder must be one of"):
        context.request(["pixels"])
    # A split that is both train and test (transfer onto one split) is embedded once.
    same = EvalContext(None, None, {}, "ckpt", "/data/test", "/data/test", "test")
    passes.clear()
    same.features_for("test", ["trained"])
    same.features_for("train", ["trained"])
    assert passes == [("test", ["trained"])]


def test_one_file_holds_every_encoders_column_and_each_split_reads_its_own(tmp_path):
    import numpy as np
    import pyarrow as pa

    from pipeline.eval.features import write_feature_columns

    gen = np.random.default_rng(0)

    def table(start, rows):
        columns = {"id": pa.array([f"r{i}" for i in range(start, start + rows)], pa.string())}
        for name, dim in (("a", 3), ("b", 5)):
            values = gen.standard_normal((rows, dim)).astype(np.float32)
            columns[name] = pa.FixedSizeListArray.from_arrays(values.reshape(-1), dim)
        columns["label"] = pa.array(np.arange(start, start + rows) % 4, pa.int64())
        return pa.table(columns)

    tables = [table(0, 7), table(7, 0), table(7, 6)]
    splits = write_feature_columns(tables, str(tmp_path), ["a", "b"], row_group_rows=4)
    whole = pa.concat_tables(tables)
    for name, dim in (("a", 3), ("b", 5)):
        split = splits[name]
        assert (split.rows, split.dim, split.column) == (13, dim, name)
        assert [len(x) for x, _ in split.batches(5)] == [5, 5, 3]
        assert split.peak_rows <= 8  # a batch and one row group (of 7 rows) at most
        features, labels = split.load()
        expected = whole.column(name).combine_chunks().flatten().to_numpy().reshape(13, dim)
        np.testing.assert_array_equal(features.numpy(), expected)
        assert labels.tolist() == whole.column("label").to_pylist()
    assert splits["a"].files == splits["b"].files
    splits["a"].delete()
    splits["b"].delete()  # the shared file is gone already: nothing to do
    assert not list(tmp_path.iterdir())
