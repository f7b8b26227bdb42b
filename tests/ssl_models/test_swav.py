"""SwAV: Sinkhorn-Knopp marginals and reference values, distributed codes, the swapped loss
worked by hand, prototype normalisation and freezing, the queue, multi-crop forward."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_models import build_method
from ssl_models.losses.swav import sinkhorn_knopp, swapped_prediction_loss
from ssl_models.method import Batch
from ssl_models.methods.swav import SwAV
from ssl_models.registry import method_params
from tests.ssl_models.distributed import run_on_ranks
from tests.ssl_models.helpers import (
    check_forward_backward,
    noisy_views,
    tiny_backbone,
    train_losses,
)

WORLD = 2


def _cosine_scores(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, 16, generator=g), dim=1)
    c = F.normalize(torch.randn(k, 16, generator=g), dim=1)
    return z @ c.T


def _reference_sinkhorn(scores: list[list[float]], eps: float, iters: int) -> list[list[float]]:
    """The paper's Algorithm 1 in plain Python, on an (n samples x K prototypes) list."""
    n, k = len(scores), len(scores[0])
    q = [[math.exp(scores[b][j] / eps) for b in range(n)] for j in range(k)]  # K x n
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iters):
        q = [[v * (1 / k) / sum(row) for v in row] for row in q]  # prototype sums -> 1/K
        cols = [sum(q[j][b] for j in range(k)) for b in range(n)]
        q = [[q[j][b] * (1 / n) / cols[b] for b in range(n)] for j in range(k)]  # -> 1/n
    cols = [sum(q[j][b] for j in range(k)) for b in range(n)]
    return [[q[j][b] / cols[b] for j in range(k)] for b in range(n)]  # n x K


# --- Sinkhorn-Knopp ----------------------------------------------------------------------


def test_sinkhorn_marginals():
    n, k = 32, 8
    scores = _cosine_scores(n, k, seed=0)
    q = sinkhorn_knopp(scores)  # the paper's 3 iterations, epsilon 0.05
    assert q.shape == (n, k) and (q >= 0).all()
    # Each sample's code is a distribution (the paper's columns of Q sum to 1) ...
    assert torch.allclose(q.sum(dim=1), torch.ones(n), atol=1e-5)

    # ... and the prototypes share the batch equally, B / K each, in the limit: the last
    # step fixes the samples' sums, so after a few iterations the prototypes' are close.
    def spread(iterations: int, epsilon: float = 0.05) -> float:
        return (sinkhorn_knopp(scores, epsilon, iterations).sum(dim=0) - n / k).abs().max()

    plain = (torch.softmax(scores / 0.05, dim=1).sum(dim=0) - n / k).abs().max()
    deviations = [spread(i) for i in (1, 3, 10, 30)]
    assert plain > deviations[0] and deviations == sorted(deviations, reverse=True)
    assert deviations[-1] < 1e-3 * n / k
    assert spread(3, epsilon=0.2) < 0.02 * n / k  # smoother scores converge faster


def test_sinkhorn_matches_plain_reference_on_3x2():
    scores = torch.tensor([[0.9, -0.2], [0.3, 0.5], [-0.7, 0.8]])  # 3 samples, 2 prototypes
    for eps, iters in ((0.05, 3), (0.5, 1), (1.0, 5)):
        expected = torch.tensor(_reference_sinkhorn(scores.tolist(), eps, iters))
        assert torch.allclose(sinkhorn_knopp(scores, eps, iters), expected, atol=1e-6)


def test_sinkhorn_rejects_bad_parameters():
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_knopp(torch.zeros(2, 2), epsilon=0.0)


def _rank_codes(r: int) -> dict:
    n, k, dim = 6, 4, 8
    scores = _cosine_scores(2 * n, k, seed=1)
    rows = slice(r * n, (r + 1) * n)
    # The method's queue path: the same global queue buffer on both ranks, each rank using
    # its own rows of every queued global batch.
    model = SwAV(*tiny_backbone(), num_prototypes=k, queue_length=4 * n, projection_dim=dim)
    queue, z = _queue_and_batch(model, n)
    model.queue_filled.fill_(4 * n)
    return {
        "codes": sinkhorn_knopp(scores[rows]),
        "queue_codes": model.codes([z[rows], z[rows] + 0.1])[0],
    }


def _queue_and_batch(model: SwAV, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    dim = model.prototypes.in_features
    for queue in model.queues:
        queue.features.copy_(F.normalize(torch.randn(4 * n, dim, generator=g), dim=1))
    model.normalize_prototypes()
    return model.queues[0].features, F.normalize(torch.randn(2 * n, dim, generator=g), dim=1)


def test_two_processes_get_their_rows_of_the_single_process_codes(tmp_path):
    results = run_on_ranks(_rank_codes, WORLD, tmp_path)
    n, k = 6, 4
    expected = sinkhorn_knopp(_cosine_scores(2 * n, k, seed=1))
    assert torch.allclose(torch.cat([res["codes"] for res in results]), expected, atol=1e-6)

    model = SwAV(*tiny_backbone(), num_prototypes=k, queue_length=4 * n, projection_dim=8)
    queue, z = _queue_and_batch(model, n)
    model.queue_filled.fill_(4 * n)
    # Codes over (whole queue + whole batch) in one process, batch rows kept.
    single = model.codes([z, z + 0.1])[0]
    direct = sinkhorn_knopp(torch.cat([queue, z]) @ model.prototypes.weight.T)[-2 * n :]
    assert torch.allclose(single, direct, atol=1e-6)
    assert torch.allclose(torch.cat([res["queue_codes"] for res in results]), single, atol=1e-6)


# --- the swapped prediction loss ---------------------------------------------------------


def test_swapped_loss_worked_example():
    # T = 0.1 and scores [T ln 3, 0] give softmax (3/4, 1/4). Crops: global 0 predicts
    # (1/2, 1/2), global 1 (3/4, 1/4), local 2 (1/4, 3/4); codes q0 = (1, 0), q1 = (0, 1).
    t, a = 0.1, 0.1 * math.log(3)
    scores = [
        torch.tensor([[0.0, 0.0]], requires_grad=True),
        torch.tensor([[a, 0.0]], requires_grad=True),
        torch.tensor([[0.0, a]], requires_grad=True),
    ]
    codes = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    loss = swapped_prediction_loss(scores, codes, (0, 1), temperature=t)
    # q0 from crops 1, 2: (-ln 3/4 - ln 1/4) / 2; q1 from crops 0, 2: (-ln 1/2 - ln 3/4) / 2.
    sub0 = (math.log(4 / 3) + math.log(4)) / 2
    sub1 = (math.log(2) + math.log(4 / 3)) / 2
    assert loss.item() == pytest.approx((sub0 + sub1) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(1.75 * math.log(2) - 0.5 * math.log(3), abs=1e-6)
    # d CE / d logits = (softmax - q) / T, weighted 1/2 (other crops) x 1/2 (assign crops).
    loss.backward()
    assert torch.allclose(scores[0].grad, torch.tensor([[0.5, -0.5]]) / (4 * t))  # for q1
    assert torch.allclose(scores[1].grad, torch.tensor([[-0.25, 0.25]]) / (4 * t))  # for q0
    local = (torch.tensor([0.25 - 1, 0.75]) + torch.tensor([0.25, 0.75 - 1])) / (4 * t)
    assert torch.allclose(scores[2].grad, local.unsqueeze(0))  # predicts both codes


def test_swapped_loss_averages_rows_and_rejects_one_crop():
    g = torch.Generator().manual_seed(0)
    scores = [torch.randn(3, 4, generator=g) for _ in range(3)]
    codes = [torch.softmax(torch.randn(3, 4, generator=g), 1) for _ in range(2)]
    per_row = [
        swapped_prediction_loss(
            [s[i : i + 1] for s in scores], [q[i : i + 1] for q in codes], (0, 1)
        )
        for i in range(3)
    ]
    batch = swapped_prediction_loss(scores, codes, (0, 1))
    assert batch.item() == pytest.approx(torch.stack(per_row).mean().item(), abs=1e-6)
    with pytest.raises(ValueError, match="at least 2 crops"):
        swapped_prediction_loss(scores[:1], codes[:1], (0,))


# --- the method --------------------------------------------------------------------------


def _model(**options) -> SwAV:
    options = {"num_prototypes": 6, "projection_hidden_dim": 32, "projection_dim": 8} | options
    return SwAV(*tiny_backbone(), **options)


def test_forward_global_only_and_multi_crop_one_backbone_pass_per_resolution():
    for local in (0, 4):
        model = _model()
        calls = []
        model.backbone.register_forward_hook(
            lambda m, args, out, calls=calls: calls.append(args[0].shape)
        )
        views = noisy_views(8, 16, seed=0) + noisy_views(8, 8, seed=1, count=local)
        check_forward_backward(model, views, {"loss", "prototypes_used"})
        assert [c[0] for c in calls] == ([16] if local == 0 else [16, 32])
        assert model.prototypes.weight.grad is not None


def test_prototypes_are_unit_norm_after_normalisation():
    model = _model()
    with torch.no_grad():
        model.prototypes.weight.mul_(3.0)
    model.normalize_prototypes()
    assert torch.allclose(model.prototypes.weight.norm(dim=1), torch.ones(6), atol=1e-6)
    with torch.no_grad():
        model.prototypes.weight.mul_(0.5)
    model(Batch(noisy_views(8, 16, seed=0)))  # forward normalises first, as each official iteration
    assert torch.allclose(model.prototypes.weight.norm(dim=1), torch.ones(6), atol=1e-6)


def test_prototypes_frozen_for_the_first_iterations_then_trained():
    model = _model(freeze_prototypes_iters=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    changed = []
    for step in range(4):
        out = model(Batch(noisy_views(8, 16, seed=step)))
        before = model.prototypes.weight.detach().clone()  # normalised by the forward
        opt.zero_grad()
        out.loss.backward()
        model.before_optimizer_step(step)
        opt.step()
        model.after_optimizer_step(step, 4)
        changed.append(not torch.equal(model.prototypes.weight, before))
    assert changed == [False, False, True, True]


def _queue_step(model: SwAV, step: int) -> torch.Tensor:
    """One forward and the step bookkeeping (no update: weights fixed); the embeddings."""
    views = noisy_views(4, 16, seed=10 + step)
    with torch.no_grad():
        z = model.embed(views)  # train-mode BN: the same batch statistics as the forward
    model(Batch(views))
    model.after_optimizer_step(step, 100)
    return z


def test_queue_starts_at_its_epoch_fills_fifo_is_used_and_checkpoints():
    model = _model(queue_length=8, epoch_queue_starts=2)
    model.set_schedule(steps_per_epoch=1, total_steps=100)
    initial = [queue.features.clone() for queue in model.queues]
    for step in range(2):  # epochs 0 and 1: no queue
        _queue_step(model, step)
        assert int(model.queue_filled) == 0
        assert all(torch.equal(q.features, f) for q, f in zip(model.queues, initial, strict=True))
    z = [_queue_step(model, step) for step in (2, 3, 4)]  # the 3rd push replaces the 1st
    assert int(model.queue_filled) == 8 and int(model.steps_done) == 5
    for i, queue in enumerate(model.queues):  # queue i holds crop i's embeddings
        assert torch.allclose(queue.features[:4], z[2][4 * i : 4 * (i + 1)], atol=1e-6)
        assert torch.allclose(queue.features[4:], z[1][4 * i : 4 * (i + 1)], atol=1e-6)

    # Once full, codes are computed over queue + batch and differ from the batch-only codes.
    batch = list(F.normalize(torch.randn(2, 4, 8), dim=2))
    codes = model.codes(batch)
    weight = model.prototypes.weight
    for i, queue in enumerate(model.queues):
        expected = sinkhorn_knopp(torch.cat([queue.features, batch[i]]) @ weight.T)[-4:]
        assert torch.allclose(codes[i], expected, atol=1e-6)
        assert not torch.allclose(codes[i], sinkhorn_knopp(batch[i] @ weight.T), atol=1e-3)

    fresh = _model(queue_length=8, epoch_queue_starts=2)
    with torch.no_grad():  # different weights everywhere until the state is loaded
        for p in fresh.parameters():
            p.add_(1.0)
    fresh.load_state_dict(model.state_dict())
    for queue, restored in zip(model.queues, fresh.queues, strict=True):
        assert torch.equal(queue.features, restored.features)
    assert int(fresh.queue_filled) == 8 and int(fresh.steps_done) == 5
    assert all(torch.allclose(a, b) for a, b in zip(fresh.codes(batch), codes, strict=True))


def test_queue_needs_the_schedule_and_eval_leaves_it_alone():
    model = _model(queue_length=8, epoch_queue_starts=0)
    with pytest.raises(RuntimeError, match="set_schedule"):
        model(Batch(noisy_views(4, 16, seed=0)))
    model.set_schedule(steps_per_epoch=1, total_steps=10)
    model.eval()
    model(Batch(noisy_views(4, 16, seed=0)))
    assert int(model.queue_filled) == 0


def test_registry_builds_swav_with_options():
    model = build_method(
        "swav", backbone="small_cnn", width=0.25, in_channels=1, num_prototypes=10, queue_length=0
    )
    assert isinstance(model, SwAV) and model.declared().local_views
    assert model.prototypes.weight.shape == (10, 128) and len(model.queues) == 0
    params = method_params("swav")
    assert params["temperature"] == 0.1 and params["epsilon"] == 0.05
    assert params["sinkhorn_iterations"] == 3 and params["epoch_queue_starts"] == 15


def test_multi_crop_loss_decreases_without_collapse_on_fixed_batch():
    model = _model(freeze_prototypes_iters=0)
    views = noisy_views(16, 16, seed=1) + noisy_views(16, 8, seed=2)
    losses = train_losses(model, views, steps=20, lr=0.05)
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    # The equipartition keeps the batch spread over the prototypes (6 here).
    assert model(Batch(views)).logs["prototypes_used"] >= 4
