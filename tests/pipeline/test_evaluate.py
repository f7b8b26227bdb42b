"""Weighted kNN: hand-computed votes, perfect and chance-level features."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.evaluate import KNNReport, KNNRow, knn_accuracy, knn_predict, raw_pixel_features


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
    from pipeline.evaluate import feature_spread

    gen = torch.Generator().manual_seed(0)
    spread_out = torch.randn(2000, 64, generator=gen)
    collapsed = torch.ones(2000, 64) + 1e-4 * torch.randn(2000, 64, generator=gen)
    assert abs(feature_spread(spread_out) - 1.0) < 0.05
    assert feature_spread(collapsed) < 0.01
