"""The classifier trainer shared by the linear probe and fine-tuning: its settings' checks, the
cosine schedule over every step, a separable task learned, and top-k hit counting."""

import math

import pytest
import torch

from pipeline.eval.classifier import SGDSettings, TopkHits, count_hits, new_head, train_classifier

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("epochs", "batch_size", "lr"), [(0, 8, 0.1), (1, 0, 0.1), (1, 8, 0.0)])
def test_settings_refuse_an_empty_schedule(epochs, batch_size, lr):
    with pytest.raises(ValueError, match="need epochs >= 1, batch_size >= 1, lr > 0"):
        SGDSettings(epochs, batch_size, lr, weight_decay=0.0, seed=0, device="cpu")


def test_head_is_small_and_seeded():
    first = new_head(6, 3, torch.Generator().manual_seed(1))
    again = new_head(6, 3, torch.Generator().manual_seed(1))
    assert torch.equal(first.weight, again.weight) and not first.bias.any()
    assert first.weight.abs().max() < 0.05


def test_trainer_decays_the_rate_along_a_cosine_and_learns_a_separable_task():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 2
    features = torch.randn(64, 4, generator=gen) + 4 * labels.view(-1, 1).float()
    settings = SGDSettings(epochs=10, batch_size=16, lr=0.5, weight_decay=0.0, seed=0, device="cpu")
    head = new_head(4, 2, gen)
    optimizer = settings.optimizer(head.parameters())
    rates = []

    def inputs(batch):  # called after the step's rate is set
        rates.append(optimizer.param_groups[0]["lr"])
        return batch

    def epoch_batches(epoch):
        return [(features[s : s + 16], labels[s : s + 16]) for s in range(0, 64, 16)]

    steps = train_classifier(head, optimizer, epoch_batches, inputs, settings, steps_per_epoch=4)
    assert steps == 40 and len(rates) == 40
    expected = [0.5 * 0.5 * (1 + math.cos(math.pi * step / 40)) for step in range(40)]
    assert rates == pytest.approx(expected)
    hits = count_hits(head, epoch_batches(0), lambda batch: batch)
    assert hits.accuracy() == {"top1": 1.0, "top5": 1.0}


def test_hits_count_top1_and_top5():
    scores = torch.tensor([[0.0, 1, 2, 3, 4, 5], [5.0, 4, 3, 2, 1, 0], [0.0, 1, 2, 3, 4, 5]])
    hits = TopkHits()
    hits.add(scores[:2], torch.tensor([5, 5]))  # first: top-1; second: 6th best, a miss
    hits.add(scores[2:], torch.tensor([1]))  # 5th best: a top-5 hit only
    assert (hits.rows, hits.top1, hits.top5) == (3, 1, 2)
    assert hits.accuracy(top5=False) == {"top1": 1 / 3}
    with pytest.raises(ValueError, match="no rows were scored"):
        TopkHits().accuracy()
