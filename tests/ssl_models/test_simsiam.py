import pytest
import torch
from torch import nn

from ssl_models import SSLMethod
from ssl_models.losses.cosine import negative_cosine_similarity
from ssl_models.method import Batch
from ssl_models.methods.simsiam import SimSiam
from tests.ssl_models.helpers import noisy_views, tiny_backbone, train_losses


def _tiny_simsiam(**kwargs) -> SimSiam:
    backbone, dim = tiny_backbone()
    return SimSiam(backbone, dim, projection_dim=32, predictor_hidden_dim=8, **kwargs)


def _views(seed: int = 1) -> list[torch.Tensor]:
    return noisy_views(8, 16, seed)


def test_negative_cosine_matches_hand_computed_values():
    # cos([1,0],[0,1]) = 0; cos([1,1],[2,2]) = 1; cos([1,2],[2,1]) = 4/5.
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]])
    z = torch.tensor([[0.0, 1.0], [2.0, 2.0], [2.0, 1.0]])
    assert negative_cosine_similarity(p[:1], z[:1]).item() == pytest.approx(0.0, abs=1e-6)
    assert negative_cosine_similarity(p[1:2], z[1:2]).item() == pytest.approx(-1.0, abs=1e-6)
    expected = -(0.0 + 1.0 + 0.8) / 3
    assert negative_cosine_similarity(p, z).item() == pytest.approx(expected, abs=1e-6)


def test_forward_logs_and_gradients():
    model = _tiny_simsiam()
    assert isinstance(model, SSLMethod)
    out = model(Batch(_views()))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert -1.0 <= out.loss.item() <= 1.0
    assert set(out.logs) == {"loss", "z_std"}
    assert all(not v.requires_grad for v in out.logs.values())
    # Healthy (random) outputs: std of normalised z is near 1/sqrt(d).
    assert 0.3 / 32**0.5 < out.logs["z_std"].item() < 1.5 / 32**0.5
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_stop_gradient_on_target_branch():
    model = _tiny_simsiam()
    views = _views()
    z = model.projector(model.backbone(torch.cat(views)))
    p_1, p_2 = model.predictor(z).chunk(2)
    z_1, z_2 = z.chunk(2)
    # Gradient w.r.t. z through the target terms only, with and without stop-gradient.
    with_sg = negative_cosine_similarity(p_1, z_2.detach()) + negative_cosine_similarity(
        p_2, z_1.detach()
    )
    no_sg = negative_cosine_similarity(p_1, z_2) + negative_cosine_similarity(p_2, z_1)
    (g_target,) = torch.autograd.grad(no_sg, z, retain_graph=True)
    (g_sg,) = torch.autograd.grad(with_sg, z, retain_graph=True)
    assert g_target.abs().sum() > 0  # the target branch would contribute without sg
    # The method's loss gives exactly the gradients of the stop-gradient version.
    model.zero_grad()
    model(Batch(views)).loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (with_sg / 2).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-6), n
    assert not torch.allclose(g_sg, g_target)


def test_output_bn_has_no_affine_and_predictor_has_no_output_bn():
    for layers in (2, 3):
        model = _tiny_simsiam(projection_layers=layers)
        proj = list(model.projector.layers)
        assert sum(isinstance(m, nn.Linear) for m in proj) == layers
        bns = [m for m in proj if isinstance(m, nn.BatchNorm1d)]
        assert len(bns) == layers  # BN after every linear layer, output included
        assert isinstance(proj[-1], nn.BatchNorm1d)
        assert not proj[-1].affine and proj[-1].weight is None and proj[-1].bias is None
        assert all(bn.affine for bn in bns[:-1])
        pred = list(model.predictor.layers)
        assert isinstance(pred[-1], nn.Linear) and pred[-1].out_features == 32
        assert pred[0].out_features == 8  # bottleneck


def test_parameter_groups_put_predictor_on_fixed_lr():
    model = _tiny_simsiam()
    groups = model.parameter_groups(5e-4)
    fixed = [id(p) for g in groups if g.get("fixed_lr") for p in g["params"]]
    assert sorted(fixed) == sorted(id(p) for p in model.predictor.parameters())
    listed = [id(p) for g in groups for p in g["params"]]
    assert len(listed) == len(set(listed))
    assert set(listed) == {id(p) for p in model.parameters() if p.requires_grad}
    for g in groups:
        if g["exclude_from_lars"]:
            assert g["weight_decay"] == 0.0 and all(p.ndim <= 1 for p in g["params"])
        else:
            assert g["weight_decay"] == 5e-4 and all(p.ndim > 1 for p in g["params"])
    # Both predictor groups (weights and biases/norms) are present.
    assert sum(1 for g in groups if g.get("fixed_lr")) == 2
    torch.optim.SGD(groups, lr=0.1)  # valid optimiser input


def test_rejects_wrong_number_of_views():
    with pytest.raises(ValueError, match=r"takes \d+ views?"):
        _tiny_simsiam()(Batch([torch.randn(2, 1, 16, 16)]))


def test_loss_decreases_on_fixed_batch():
    model = _tiny_simsiam()
    losses = train_losses(model, _views(seed=2), params=model.parameter_groups(0.0))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1
