"""MoCo v3: heads, momentum encoder and its schedule, loss wiring, training, two gloo ranks."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ssl_models import SSLMethod, build_method
from ssl_models.losses.info_nce import info_nce_loss
from ssl_models.method import Batch
from ssl_models.methods.moco_v3 import MoCoV3
from ssl_models.momentum import cosine_momentum
from tests.ssl_models.distributed import run_on_ranks
from tests.ssl_models.helpers import noisy_views, tiny_backbone, train_losses


def _tiny_moco(seed: int = 0, **options) -> MoCoV3:
    backbone, dim = tiny_backbone(seed)
    options = {"projection_hidden_dim": 32, "projection_dim": 16} | options
    return MoCoV3(backbone, dim, **options)


def _views(seed: int = 1) -> list[torch.Tensor]:
    return noisy_views(8, 16, seed)


def _pairs(model: MoCoV3):
    yield model.momentum_backbone, model.backbone
    yield model.momentum_projector, model.projector


def _linears(head: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in head.modules())


def _ends_in_plain_bn(head: nn.Module) -> bool:
    last = list(head.layers)[-1]
    return isinstance(last, nn.BatchNorm1d) and not last.affine


def test_heads_follow_the_official_code_for_a_cnn():
    model = _tiny_moco()  # MoCo_ResNet: 2-layer projector with output BN, predictor without
    assert _linears(model.projector) == 2 and _ends_in_plain_bn(model.projector)
    assert _linears(model.predictor) == 2 and isinstance(
        list(model.predictor.layers)[-1], nn.Linear
    )


@pytest.mark.parametrize("backbone", ["vit_tiny", "timm:test_vit"])
def test_heads_follow_the_official_code_for_a_vit(backbone):
    # MoCo_ViT: 3-layer projector and 2-layer predictor, both ending in BN.
    model = build_method(
        "moco_v3", backbone=backbone, width=0.25 if backbone == "vit_tiny" else 1.0, in_channels=1
    )
    assert _linears(model.projector) == 3 and _ends_in_plain_bn(model.projector)
    assert _linears(model.predictor) == 2 and _ends_in_plain_bn(model.predictor)


def test_momentum_encoder_starts_as_frozen_exact_copy_without_predictor():
    model = _tiny_moco()
    assert isinstance(model, SSLMethod)
    for teacher, student in _pairs(model):
        for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
            assert torch.equal(t, s) and t is not s and not t.requires_grad
        for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
            assert torch.equal(t, s)
    n_online = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_momentum = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    n_predictor = sum(p.numel() for p in model.predictor.parameters())
    assert n_momentum == n_online - n_predictor


def test_forward_loss_is_symmetric_scaled_in_batch_info_nce():
    model = _tiny_moco()
    before = copy.deepcopy(model)
    x_1, x_2 = _views()
    out = model(Batch([x_1, x_2]))
    with torch.no_grad():
        q_1 = before.predictor(before.projector(before.backbone(x_1)))
        q_2 = before.predictor(before.projector(before.backbone(x_2)))
        k_1 = before.momentum_projector(before.momentum_backbone(x_1))
        k_2 = before.momentum_projector(before.momentum_backbone(x_2))
        t = before.temperature
        expected = 2 * t * (info_nce_loss(q_1, k_2, None, t) + info_nce_loss(q_2, k_1, None, t))
    assert torch.allclose(out.loss, expected, atol=1e-5)
    assert set(out.logs) == {"loss", "pos_sim", "momentum"}
    assert all(not v.requires_grad for v in out.logs.values())
    assert out.logs["momentum"].item() == pytest.approx(0.99)


def test_momentum_encoder_gets_no_gradient_and_follows_the_cosine_ema():
    model = _tiny_moco()
    opt = torch.optim.SGD(model.parameter_groups(0.0), lr=0.5)
    out = model(Batch(_views()))
    opt.zero_grad()
    out.loss.backward()
    for teacher, student in _pairs(model):
        assert all(p.grad is None for p in teacher.parameters())
        assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())
    old = [[p.clone() for p in teacher.parameters()] for teacher, _ in _pairs(model)]
    opt.step()
    model.after_optimizer_step(3, 10)

    m = cosine_momentum(3, 10, 0.99)
    assert 0.99 < m < 1.0 and model.momentum == m
    for (teacher, student), olds in zip(_pairs(model), old, strict=True):
        for t, s, t_old in zip(teacher.parameters(), student.parameters(), olds, strict=True):
            # The same arithmetic as the update, bit for bit, and the formula to rounding.
            assert torch.equal(t, t_old.mul(m).add(s, alpha=1 - m))
            assert torch.allclose(t, m * t_old + (1 - m) * s, rtol=0, atol=1e-6)
        pairs = zip(teacher.parameters(), olds, strict=True)
        assert any(not torch.equal(t, t_old) for t, t_old in pairs)
    assert model(Batch(_views())).logs["momentum"].item() == pytest.approx(m)
    # The schedule ends at 1: the momentum encoder stops moving.
    model.after_optimizer_step(10, 10)
    assert model.momentum == 1.0


def test_rejects_wrong_number_of_views():
    with pytest.raises(ValueError, match=r"takes \d+ views?"):
        _tiny_moco()(Batch(_views()[:1]))


def test_loss_decreases_on_fixed_batch():
    model = _tiny_moco()
    losses = train_losses(model, _views(), params=model.parameter_groups(0.0))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


# --- two gloo ranks -------------------------------------------------------------------
#
# Keys are constants, so rank r's loss is the mean over its own n queries of a cross-entropy
# whose candidates are all N = R * n gathered keys. The single-process loss over the global
# batch is the mean over all N queries: L = (1 / R) * sum_r loss_r. Query rows of rank r
# appear only in loss_r, hence d loss_r / d q_r = R * dL / d q_r: each rank's gradient on its
# own rows is R times the single-process gradient (the ssl_models.dist convention), no
# gradient has to cross ranks, and DDP's average of parameter gradients, (1 / R) sum_r
# d loss_r / d theta, is exactly dL / d theta.

WORLD, N, IN_DIM, DIM, T = 2, 8, 6, 5, 0.2


def _embeddings():
    g = torch.Generator().manual_seed(0)
    q_1, q_2, k_1, k_2 = (torch.randn(N, DIM, generator=g) for _ in range(4))
    x = torch.randn(N, IN_DIM, generator=g)
    torch.manual_seed(0)
    return q_1, q_2, k_1, k_2, x, nn.Linear(IN_DIM, DIM)


def _moco_v3_loss(q_1, q_2, k_1, k_2):
    """The MoCo v3 objective on embeddings: symmetric, each term scaled by 2t."""
    return 2 * T * (info_nce_loss(q_1, k_2, None, T) + info_nce_loss(q_2, k_1, None, T))


def _loss_and_grads(q_1, q_2, k_1, k_2):
    q_1, q_2 = q_1.clone().requires_grad_(), q_2.clone().requires_grad_()
    loss = _moco_v3_loss(q_1, q_2, k_1, k_2)
    loss.backward()
    return loss.detach(), q_1.grad, q_2.grad


def _on_rank(r: int) -> dict:
    q_1, q_2, k_1, k_2, x, linear = _embeddings()
    n = N // WORLD
    rows = slice(r * n, (r + 1) * n)
    loss, grad_1, grad_2 = _loss_and_grads(q_1[rows], q_2[rows], k_1[rows], k_2[rows])

    # The same loss through a DDP-wrapped layer producing the first view's queries.
    ddp = DistributedDataParallel(linear)
    _moco_v3_loss(ddp(x[rows]), q_2[rows], k_1[rows], k_2[rows]).backward()

    # One training step of the method as the pipeline runs it: DDP without buffer broadcast.
    model = _tiny_moco()
    ddp_model = DistributedDataParallel(model, broadcast_buffers=False)
    opt = torch.optim.SGD(model.parameter_groups(0.0), lr=0.1)
    out = ddp_model(Batch([v[r * 4 : (r + 1) * 4] for v in _views()]))
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    model.after_optimizer_step(0, 10)
    return {
        "model_loss": out.loss.detach(),
        "weights": torch.cat([p.detach().flatten() for p in model.parameters()]),
        "loss": loss,
        "grad_1": grad_1,
        "grad_2": grad_2,
        "weight_grad": linear.weight.grad,
        "bias_grad": linear.bias.grad,
    }


def test_two_ranks_match_single_process_loss_and_gradients(tmp_path):
    results = run_on_ranks(_on_rank, WORLD, tmp_path)

    q_1, q_2, k_1, k_2, x, linear = _embeddings()
    loss, grad_1, grad_2 = _loss_and_grads(q_1, q_2, k_1, k_2)
    _moco_v3_loss(linear(x), q_2, k_1, k_2).backward()

    assert torch.allclose(torch.stack([res["loss"] for res in results]).mean(), loss, atol=1e-6)
    for key, expected in (("grad_1", grad_1), ("grad_2", grad_2)):
        per_rank = torch.cat([res[key] for res in results])
        assert torch.allclose(per_rank / WORLD, expected, atol=1e-6)
        assert not torch.allclose(per_rank, expected, atol=1e-6)  # the factor is really R
    for res in results:
        assert torch.allclose(res["weight_grad"], linear.weight.grad, atol=1e-6)
        assert torch.allclose(res["bias_grad"], linear.bias.grad, atol=1e-6)
        assert torch.isfinite(res["model_loss"])
    # DDP averaged the gradients: both ranks took the same step, momentum encoder included.
    assert torch.allclose(results[0]["weights"], results[1]["weights"], atol=1e-6)
