"""Weighted kNN: hand-computed votes, perfect and chance-level features, and the streamed bank
scoring exactly as the in-memory one."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_models.knn import (
    RunningTopK,
    knn_accuracy,
    knn_predict,
    streamed_knn_accuracy,
    streamed_knn_scores,
    topk_accuracy,
)


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


def test_topk_accuracy_counts_a_label_among_the_k_best_classes():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])
    assert topk_accuracy(scores, labels, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(scores, labels, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(scores, labels, 5) == 1.0  # k beyond the classes counts every class


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


@pytest.mark.parametrize("k", [1, 5])
def test_k_larger_than_bank_is_clamped(k):
    bank = F.normalize(torch.randn(3, 4), dim=1)
    scores = knn_predict(bank, torch.tensor([0, 1, 2]), bank, 3, k=k * 10, temperature=0.1)
    assert scores.shape == (3, 3)


def _random_bank(rows: int, dim: int, classes: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(rows, dim, generator=gen), dim=1)
    return features, torch.randint(0, classes, (rows,), generator=gen)


@pytest.mark.parametrize(("k", "chunk"), [(200, 97), (5, 1000), (50, 13), (300, 64)])
def test_chunked_knn_equals_the_in_memory_knn(k, chunk):
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
    # Every bank row twice with the same label: exact ties, whose order must not matter.
    bank, labels = _random_bank(200, 8, 4, seed=2)
    bank, labels = torch.cat([bank, bank]), torch.cat([labels, labels])
    queries, _ = _random_bank(30, 8, 4, seed=3)
    chunks = [(bank[s : s + 33], labels[s : s + 33]) for s in range(0, 400, 33)]
    expected = knn_predict(bank, labels, queries, 4, k=20, temperature=0.1)
    torch.testing.assert_close(streamed_knn_scores(chunks, queries, k=20), expected)


def test_streamed_accuracy_scores_test_labels_the_bank_never_saw():
    # The bank holds classes 0 and 1 only; a query of class 2 is a miss, not an index error.
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    queries = bank.clone()
    acc = streamed_knn_accuracy([(bank, torch.tensor([0, 1]))], queries, torch.tensor([0, 2]), k=1)
    assert acc["top1"] == 0.5


def test_streamed_knn_refuses_an_unlabelled_or_empty_bank():
    queries, _ = _random_bank(3, 4, 2, seed=0)
    with pytest.raises(ValueError, match="unlabelled"):
        streamed_knn_scores([(queries, torch.tensor([0, -1, 1]))], queries)
    with pytest.raises(ValueError, match="empty"):
        streamed_knn_scores([], queries)
    with pytest.raises(ValueError, match="does not fit"):
        RunningTopK(queries, 2).update(torch.zeros(2, 5), torch.zeros(2, dtype=torch.int64))
