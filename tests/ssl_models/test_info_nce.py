"""InfoNCE against values worked out by hand, in both of its modes."""

import math

import pytest
import torch

from ssl_models.losses.info_nce import info_nce_loss


def _ce(logits: list[float], label: int) -> float:
    """-log softmax(logits)[label], written out."""
    return -math.log(math.exp(logits[label]) / sum(math.exp(x) for x in logits))


def test_queue_mode_matches_hand_computed_value():
    # Unnormalised on purpose: the loss normalises q, k and the negatives itself.
    q = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # -> (1, 0), (0, 1)
    k = torch.tensor([[3.0, 4.0], [0.0, -2.0]])  # -> (0.6, 0.8), (0, -1)
    negatives = torch.tensor([[0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]])  # last -> (r, r)
    t, r = 0.5, 1 / math.sqrt(2)
    # Row logits are [q.k | q.negatives] / t and the positive sits at index 0.
    row_0 = [0.6 / t, 0.0 / t, -1.0 / t, r / t]
    row_1 = [-1.0 / t, 1.0 / t, 0.0 / t, r / t]
    expected = (_ce(row_0, 0) + _ce(row_1, 0)) / 2
    loss = info_nce_loss(q, k, negatives, t)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_in_batch_mode_matches_hand_computed_value():
    q = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # -> (1, 0), (0, 1)
    k = torch.tensor([[2.0, 0.0], [3.0, 4.0]])  # -> (1, 0), (0.6, 0.8)
    t = 1.0
    # Every query meets every key of the batch; row i's positive is key i.
    row_0 = [1.0 / t, 0.6 / t]
    row_1 = [0.0 / t, 0.8 / t]
    expected = (_ce(row_0, 0) + _ce(row_1, 1)) / 2
    loss = info_nce_loss(q, k, None, t)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_queue_mode_has_no_in_batch_negatives():
    # Queue mode with an empty queue leaves only the positive: loss exactly 0.
    q, k = torch.randn(4, 3), torch.randn(4, 3)
    assert info_nce_loss(q, k, torch.empty(0, 3), 0.2).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("queue", [True, False])
def test_gradient_reaches_queries_only(queue):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 8, generator=g, requires_grad=True)
    k = torch.randn(4, 8, generator=g, requires_grad=True)
    negatives = torch.randn(6, 8, generator=g, requires_grad=True) if queue else None
    info_nce_loss(q, k, negatives, 0.2).backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
    assert k.grad is None
    if negatives is not None:
        assert negatives.grad is None


def test_rejects_bad_arguments():
    q = torch.randn(4, 8)
    with pytest.raises(ValueError, match="temperature"):
        info_nce_loss(q, q, None, 0.0)
    with pytest.raises(ValueError, match="must match"):
        info_nce_loss(q, torch.randn(3, 8), None, 0.2)
