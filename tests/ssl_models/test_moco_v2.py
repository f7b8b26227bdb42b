"""MoCo v2: key encoder, queue, loss wiring, checkpoints, training and two gloo ranks."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ssl_models import SSLMethod
from ssl_models.batch_norm import SplitBatchNorm
from ssl_models.losses.info_nce import info_nce_loss
from ssl_models.method import Batch
from ssl_models.methods.moco_v2 import MoCoV2
from tests.ssl_models.distributed import run_on_ranks
from tests.ssl_models.helpers import noisy_views, tiny_backbone, train_losses

BATCH = 8


def _tiny_moco(seed: int = 0, **options) -> MoCoV2:
    backbone, dim = tiny_backbone(seed)
    # Plain BN (one split): keys then do not depend on the shuffle's draw, so the tests can
    # recompute them in batch order (split BN has its own test below).
    options = {"queue_size": 16, "projection_hidden_dim": 32, "projection_dim": 16} | options
    return MoCoV2(backbone, dim, **({"bn_splits": 1} | options))


def test_one_process_gets_split_bn_in_both_encoders():
    backbone, dim = tiny_backbone(0)
    model = MoCoV2(backbone, dim)
    for encoder in (model.backbone, model.key_backbone):
        norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert norms and all(isinstance(m, SplitBatchNorm) and m.num_splits == 8 for m in norms)
    # Keys are shuffled before the key encoder, so with 8 interleaved sub-batches a key is
    # normalised with its own query's sub-batch only by chance (1 in 8).
    x_1, x_2 = noisy_views(64, 16, 3)
    model(Batch([x_1, x_2])).loss.backward()


def _views(seed: int = 1) -> list[torch.Tensor]:
    return noisy_views(BATCH, 16, seed)


def _pairs(model: MoCoV2):
    yield model.key_backbone, model.backbone
    yield model.key_projector, model.projector


def test_key_encoder_starts_as_frozen_exact_copy():
    model = _tiny_moco()
    assert isinstance(model, SSLMethod)
    for key, query in _pairs(model):
        for k, q in zip(key.parameters(), query.parameters(), strict=True):
            assert torch.equal(k, q) and k is not q
            assert not k.requires_grad
        for k, q in zip(key.buffers(), query.buffers(), strict=True):
            assert torch.equal(k, q)
    trainable = {id(p) for g in model.parameter_groups(1e-4) for p in g["params"]}
    assert not trainable & {id(p) for p in model.key_backbone.parameters()}
    assert not trainable & {id(p) for p in model.key_projector.parameters()}


def test_forward_loss_is_symmetrised_info_nce_against_the_queue():
    model = _tiny_moco()
    before = copy.deepcopy(model)
    x_1, x_2 = _views()
    out = model(Batch([x_1, x_2]))
    with torch.no_grad():
        q_1 = before.projector(before.backbone(x_1))
        q_2 = before.projector(before.backbone(x_2))
        k_1 = before.key_projector(before.key_backbone(x_1))
        k_2 = before.key_projector(before.key_backbone(x_2))
        queue, t = before.queue.features, before.temperature
        expected = (info_nce_loss(q_1, k_2, queue, t) + info_nce_loss(q_2, k_1, queue, t)) / 2
    assert torch.allclose(out.loss, expected, atol=1e-5)
    assert set(out.logs) == {"loss", "pos_sim"}
    assert all(not v.requires_grad for v in out.logs.values())


def test_key_encoder_gets_no_gradient_and_follows_the_ema_after_the_step():
    model = _tiny_moco()
    opt = torch.optim.SGD(model.parameter_groups(0.0), lr=0.5)
    out = model(Batch(_views()))
    opt.zero_grad()
    out.loss.backward()
    for key, query in _pairs(model):
        assert all(p.grad is None for p in key.parameters())
        assert all(p.grad is not None for p in query.parameters())
    old = [[p.clone() for p in key.parameters()] for key, _ in _pairs(model)]
    opt.step()
    model.after_optimizer_step(0, 100)

    m = model.momentum
    for (key, query), olds in zip(_pairs(model), old, strict=True):
        for k, q, k_old in zip(key.parameters(), query.parameters(), olds, strict=True):
            # The same arithmetic as the update, bit for bit, and the formula to rounding.
            assert torch.equal(k, k_old.mul(m).add(q, alpha=1 - m))
            assert torch.allclose(k, m * k_old + (1 - m) * q, rtol=0, atol=1e-6)
        pairs = zip(key.parameters(), olds, strict=True)
        assert any(not torch.equal(k, k_old) for k, k_old in pairs)
        for k, q in zip(key.buffers(), query.buffers(), strict=True):
            assert torch.equal(k, q)


def test_queue_receives_normalised_keys_fifo():
    model = _tiny_moco(queue_size=16)
    initial = model.queue.features.clone()

    before = copy.deepcopy(model)
    views = _views(seed=1)
    model(Batch(views))
    with torch.no_grad():
        keys = F.normalize(before.key_projector(before.key_backbone(views[1])), dim=1)
    assert int(model.queue.pointer) == BATCH
    assert torch.allclose(model.queue.features[:BATCH], keys, atol=1e-6)
    assert torch.equal(model.queue.features[BATCH:], initial[BATCH:])

    before = copy.deepcopy(model)
    views = _views(seed=2)
    model(Batch(views))
    with torch.no_grad():
        keys_2 = F.normalize(before.key_projector(before.key_backbone(views[1])), dim=1)
    assert int(model.queue.pointer) == 0  # 16 entries, two batches of 8: wrapped around
    assert torch.allclose(model.queue.features[BATCH:], keys_2, atol=1e-6)
    assert torch.allclose(model.queue.features[:BATCH], keys, atol=1e-6)
    norms = model.queue.features.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_eval_forward_leaves_the_queue_alone():
    model = _tiny_moco().eval()
    initial = model.queue.features.clone()
    assert torch.isfinite(model(Batch(_views())).loss)
    assert torch.equal(model.queue.features, initial) and int(model.queue.pointer) == 0


def test_queue_size_not_divisible_by_batch_is_rejected():
    model = _tiny_moco(queue_size=12)
    with pytest.raises(ValueError, match="queue_size"):
        model(Batch(_views()))


def test_queue_survives_state_dict_round_trip():
    model = _tiny_moco()
    model(Batch(_views()))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)

    restored = _tiny_moco(seed=5)
    assert not torch.equal(restored.queue.features, model.queue.features)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(restored.queue.features, model.queue.features)
    assert torch.equal(restored.queue.pointer, model.queue.pointer)
    assert int(restored.queue.pointer) == BATCH
    for k, k_restored in zip(
        model.key_backbone.parameters(), restored.key_backbone.parameters(), strict=True
    ):
        assert torch.equal(k, k_restored)


def test_rejects_wrong_number_of_views():
    with pytest.raises(ValueError, match=r"takes \d+ views?"):
        _tiny_moco()(Batch(_views()[:1]))


def test_loss_decreases_on_fixed_batch():
    model = _tiny_moco(queue_size=32)
    losses = train_losses(model, _views(), params=model.parameter_groups(0.0))
    assert all(torch.isfinite(torch.tensor(losses)))
    # The queue starts with random keys, which are easy negatives; after 32 / 8 = 4 steps it
    # holds only real keys (of these same 8 images), and from there the loss must fall.
    settled = sum(losses[4:9]) / 5
    assert sum(losses[-5:]) / 5 < 0.8 * settled


# --- two gloo ranks -------------------------------------------------------------------

WORLD, N, DIM, K, T = 2, 8, 5, 6, 0.3


def _embeddings():
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(N, DIM, generator=g),
        torch.randn(N, DIM, generator=g),
        torch.randn(K, DIM, generator=g),
    )


def _queue_loss_and_grad(q, k, negatives):
    q = q.clone().requires_grad_()
    loss = info_nce_loss(q, k, negatives, T)
    loss.backward()
    return loss.detach(), q.grad


def _on_rank(r: int) -> dict:
    q, k, negatives = _embeddings()
    n = N // WORLD
    rows = slice(r * n, (r + 1) * n)
    loss, grad = _queue_loss_and_grad(q[rows], k[rows], negatives)

    # One training step of the method as the pipeline runs it: DDP without buffer broadcast.
    model = _tiny_moco(queue_size=16)  # same seed on both ranks: same weights and queue
    initial = model.queue.features.clone()
    ddp = DistributedDataParallel(model, broadcast_buffers=False)
    opt = torch.optim.SGD(model.parameter_groups(0.0), lr=0.1)
    out = ddp(Batch([v[rows] for v in _views()]))
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    model.after_optimizer_step(0, 10)
    return {
        "loss": loss,
        "grad": grad,
        "model_loss": out.loss.detach(),
        "initial": initial,
        "queue": model.queue.features.clone(),
        "pointer": int(model.queue.pointer),
        "weights": torch.cat([p.detach().flatten() for p in model.parameters()]),
    }


def test_two_ranks_share_one_queue_and_match_single_process_loss(tmp_path):
    results = run_on_ranks(_on_rank, WORLD, tmp_path)

    # Queue-mode InfoNCE: the mean of the per-rank losses is the single-process loss, and
    # with constant keys a rank's gradient on its own queries is WORLD x the single-process
    # gradient on those rows (DDP's average over ranks removes the factor).
    q, k, negatives = _embeddings()
    loss, grad = _queue_loss_and_grad(q, k, negatives)
    assert torch.allclose(torch.stack([r["loss"] for r in results]).mean(), loss, atol=1e-6)
    assert torch.allclose(torch.cat([r["grad"] for r in results]) / WORLD, grad, atol=1e-6)

    # Keys gathered from both ranks went into the queue: it advanced by the global batch
    # (8) although each rank saw 4 images, and both ranks hold the same queue.
    for r in results:
        assert torch.isfinite(r["model_loss"])
        assert r["pointer"] == BATCH
        assert torch.equal(r["queue"][BATCH:], r["initial"][BATCH:])
        assert not torch.isclose(r["queue"][:BATCH], r["initial"][:BATCH]).all(dim=1).any()
        norms = r["queue"].norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    assert torch.equal(results[0]["queue"], results[1]["queue"])
    # DDP averaged the gradients: both ranks took the same step, key encoder included.
    assert torch.allclose(results[0]["weights"], results[1]["weights"], atol=1e-6)
