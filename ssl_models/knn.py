"""Weighted kNN classification of L2-normalised features (Wu et al. 2018, arXiv:1805.01978).

Train-split features form the memory bank; each query takes its k most cosine-similar bank
rows, and each neighbour votes for its label with weight exp(similarity / T). This is the
monitor used by InstDisc, DINO, solo-learn (solo/utils/knn.py) and lightly
(lightly/utils/benchmarking/knn.py), with k=200 and T=0.1 by default.

Two forms give the same votes (up to the order of exactly tied neighbours):

- ``knn_predict`` holds the whole bank (bounded uses such as an online monitor);
- ``RunningTopK`` / ``streamed_knn_scores`` take the bank chunk by chunk and keep each
  query's running top-k (similarities and one value per neighbour, the label or the bank
  position), so memory is O(Q * k + query_block * chunk) whatever the bank size.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def knn_predict(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk: int = 1024,
) -> Tensor:
    """Class scores (Q, num_classes) from similarity-weighted votes of the k nearest bank rows.

    ``bank`` and ``queries`` must be L2-normalised, so the dot product is cosine similarity.
    """
    k = min(k, len(bank))
    scores = []
    for start in range(0, len(queries), chunk):
        sim = queries[start : start + chunk] @ bank.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(len(top_sim), num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, bank_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def topk_accuracy(scores: Tensor, labels: Tensor, k: int) -> float:
    """The fraction of rows of ``scores`` (N, C) whose ``k`` best classes hold the label."""
    k = min(k, scores.shape[1])
    hits = (scores.topk(k, dim=1).indices == labels.view(-1, 1)).any(1)
    return hits.float().mean().item()


def knn_accuracy(
    bank: Tensor, bank_labels: Tensor, queries: Tensor, labels: Tensor, k: int, temperature: float
) -> dict[str, float]:
    """Top-1 and top-5 kNN accuracy of ``queries`` against the labelled ``bank``."""
    num_classes = int(max(bank_labels.max(), labels.max())) + 1
    scores = knn_predict(bank, bank_labels, queries, num_classes, k, temperature)
    return {"top1": topk_accuracy(scores, labels, 1), "top5": topk_accuracy(scores, labels, 5)}


class RunningTopK:
    """Each query's ``k`` most similar bank rows seen so far: similarities (Q, k) and one
    int64 value per neighbour (Q, k); slots not yet filled hold -inf and value 0.

    ``queries`` (Q, D) and every bank chunk must be L2-normalised (cosine similarity). A
    chunk's similarities are a (query block x chunk) matmul whose top-k is merged with the
    running one."""

    def __init__(self, queries: Tensor, k: int, query_block: int = 1024) -> None:
        if queries.ndim != 2 or k < 1 or query_block < 1:
            raise ValueError(f"need (Q, D) queries, k >= 1, query_block >= 1; got {k}")
        self.queries = queries.float()
        self.k = k
        self.query_block = query_block
        self.similarities = torch.full((len(queries), k), -torch.inf)
        self.values = torch.zeros((len(queries), k), dtype=torch.int64)
        self.seen = 0

    @torch.no_grad()
    def update(self, bank: Tensor, values: Tensor) -> None:
        """Merge one bank chunk (B, D) and its values (B,) into every query's top-k."""
        if bank.ndim != 2 or bank.shape[1] != self.queries.shape[1] or len(values) != len(bank):
            raise ValueError(
                f"bank chunk {tuple(bank.shape)} with {len(values)} values does not fit "
                f"queries {tuple(self.queries.shape)}"
            )
        self.seen += len(bank)
        if not len(bank):
            return
        bank, values = bank.float(), values.long()
        take = min(self.k, len(bank))
        for start in range(0, len(self.queries), self.query_block):
            rows = slice(start, start + self.query_block)
            chunk_sim, chunk_idx = (self.queries[rows] @ bank.T).topk(take, dim=1)
            merged_sim = torch.cat([self.similarities[rows], chunk_sim], dim=1)
            merged_val = torch.cat([self.values[rows], values[chunk_idx]], dim=1)
            top_sim, top_idx = merged_sim.topk(self.k, dim=1)
            self.similarities[rows] = top_sim
            self.values[rows] = merged_val.gather(1, top_idx)

    def votes(self, num_classes: int, temperature: float) -> Tensor:
        """Class scores (Q, num_classes): neighbours' labels (the values) weighted by
        exp(similarity / T); unfilled slots weigh exp(-inf) = 0."""
        weights = (self.similarities / temperature).exp()
        votes = torch.zeros(len(weights), num_classes, dtype=weights.dtype)
        return votes.scatter_add_(1, self.values.clamp(min=0), weights)


def streamed_knn_scores(
    bank: Iterable[tuple[Tensor, Tensor]],
    queries: Tensor,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    query_block: int = 1024,
) -> Tensor:
    """``knn_predict`` over a bank given as (features, labels) chunks: class scores (Q, C).

    ``num_classes`` defaults to the largest bank label plus one."""
    top = RunningTopK(queries, k, query_block)
    largest = -1
    for features, labels in bank:
        if len(labels):
            if int(labels.min()) < 0:
                raise ValueError("the kNN bank has unlabelled rows (label -1)")
            largest = max(largest, int(labels.max()))
        top.update(features, labels)
    if top.seen == 0:
        raise ValueError("the kNN bank is empty")
    return top.votes(num_classes or largest + 1, temperature)


def streamed_knn_accuracy(
    bank: Iterable[tuple[Tensor, Tensor]],
    queries: Tensor,
    labels: Tensor,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    query_block: int = 1024,
) -> dict[str, float]:
    """Top-1 and top-5 kNN accuracy of ``queries`` (labels (Q,)) against a streamed bank."""
    scores = streamed_knn_scores(bank, queries, k, temperature, num_classes, query_block)
    if scores.shape[1] <= int(labels.max()):
        scores = F.pad(scores, (0, int(labels.max()) + 1 - scores.shape[1]))
    return {"top1": topk_accuracy(scores, labels, 1), "top5": topk_accuracy(scores, labels, 5)}
