"""DINO: the loss and centre worked by hand, the centre across processes, the schedules,
the hooks between backward and the optimiser step, checkpoints and multi-crop forward."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_models import METHODS, SSLMethod, build_method
from ssl_models.losses.dino import dino_loss, ema_center, teacher_temperature
from ssl_models.method import Batch
from ssl_models.methods.dino import DINO
from ssl_models.registry import method_params
from tests.ssl_models.distributed import run_on_ranks
from tests.ssl_models.helpers import check_forward_backward, tiny_backbone, validate_options

N, K = 4, 16
LOGS = {"loss", "teacher_temp", "momentum", "teacher_entropy", "kl"}


def _tiny(seed: int = 0, **options) -> DINO:
    backbone, dim = tiny_backbone(seed)
    return DINO(backbone, dim, out_dim=K, head_hidden_dim=32, bottleneck_dim=8, **options)


def _views(local: int = 0, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = [16, 16] + [8] * local
    return [torch.randn(N, 1, s, s, generator=g) for s in sizes]


def _train_step(model: DINO, opt: torch.optim.Optimizer, step: int, total: int) -> None:
    """One step in the pipeline's order of calls."""
    out = model(Batch(_views(seed=step)))
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    model.before_optimizer_step(step)
    opt.step()
    model.after_optimizer_step(step, total)


def _last_v(model: DINO) -> torch.Tensor:
    return model.head.last_layer.parametrizations.weight.original1


def _last_g(model: DINO) -> torch.Tensor:
    return model.head.last_layer.parametrizations.weight.original0


# --- the loss and the centre -------------------------------------------------------------


def test_loss_matches_hand_computed_example():
    # K = 2 prototypes, one image, 2 global views + 1 local; tau_t = 0.5, tau_s = 1,
    # C = (0.5, -0.5).
    # Teacher: (t1 - C) / tau_t = (2, 0), (t2 - C) / tau_t = (0, 2), so with a = e^2 / (e^2 + 1)
    # P1 = (a, 1 - a), P2 = (1 - a, a). Student: s1 = (0, 0) -> (1/2, 1/2),
    # s2 = (ln 3, 0) -> (3/4, 1/4), local s3 = (0, ln 3) -> (1/4, 3/4).
    t = [torch.tensor([[1.5, -0.5]]), torch.tensor([[0.5, 0.5]])]
    s = [torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3), 0.0]])]
    s.append(torch.tensor([[0.0, math.log(3)]]))
    center = torch.tensor([[0.5, -0.5]])
    a = math.exp(2) / (math.exp(2) + 1)
    b = 1 - a
    pairs = [  # (teacher 1, student 2), (1, 3), (2, 1), (2, 3); (1, 1) and (2, 2) skipped
        -(a * math.log(3 / 4) + b * math.log(1 / 4)),
        -(a * math.log(1 / 4) + b * math.log(3 / 4)),
        -(b * math.log(1 / 2) + a * math.log(1 / 2)),
        -(b * math.log(1 / 4) + a * math.log(3 / 4)),
    ]
    loss = dino_loss(s, t, center, student_temp=1.0, teacher_temp=0.5)
    assert loss.item() == pytest.approx(sum(pairs) / 4, abs=1e-6)


def test_loss_is_the_mean_over_cross_view_pairs_of_batch_mean_cross_entropies():
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(3, 5, generator=g) for _ in range(4)]
    t = [torch.randn(3, 5, generator=g) for _ in range(2)]
    c = torch.randn(1, 5, generator=g)
    terms = [
        -(F.softmax((t[i] - c) / 0.07, 1) * F.log_softmax(s[j] / 0.1, 1)).sum(1).mean()
        for i in range(2)
        for j in range(4)
        if i != j
    ]
    expected = torch.stack(terms).mean()
    assert torch.allclose(dino_loss(s, t, c, 0.1, 0.07), expected, atol=1e-6)


def test_same_view_pairs_are_skipped():
    g = torch.Generator().manual_seed(1)
    s = [torch.randn(3, 4, generator=g, requires_grad=True) for _ in range(3)]
    t = [torch.randn(3, 4, generator=g) for _ in range(2)]
    c = torch.zeros(1, 4)
    # With only teacher view 1, student view 1 is never compared: changing it does nothing.
    base = dino_loss(s, t[:1], c, 0.1, 0.04)
    moved = dino_loss([s[0] + 5.0, *s[1:]], t[:1], c, 0.1, 0.04)
    assert moved.item() == pytest.approx(base.item(), abs=1e-6)
    # With both teachers, student view 1's gradient comes from teacher view 2 only.
    (grad,) = torch.autograd.grad(dino_loss(s, t, c, 0.1, 0.04), s[0])
    (other,) = torch.autograd.grad(dino_loss(s, [t[0] * -3 + 1, t[1]], c, 0.1, 0.04), s[0])
    assert grad.abs().sum() > 0 and torch.allclose(grad, other, atol=1e-7)


def test_center_update_is_the_hand_computed_ema():
    center = torch.tensor([[1.0, -2.0, 0.0]])
    t1 = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    t2 = torch.tensor([[0.0, 0.0, 4.0], [4.0, 4.0, 0.0]])
    # Mean over the 4 teacher rows: (2, 2, 2); 0.9 * C + 0.1 * (2, 2, 2).
    expected = torch.tensor([[0.9 + 0.2, -1.8 + 0.2, 0.2]])
    assert torch.allclose(ema_center(center, [t1, t2], 0.9), expected, atol=1e-6)


def test_method_updates_center_after_the_loss_in_training_only():
    model = _tiny().eval()
    views = _views()
    with torch.no_grad():
        t = model.teacher_head(model.teacher_backbone(torch.cat(views))).chunk(2)
        s = model.head(model.backbone(torch.cat(views))).chunk(2)
    old = torch.randn(1, K)
    model.center.copy_(old)
    out = model(Batch(views))
    assert torch.equal(model.center, old)
    assert out.loss.item() == pytest.approx(dino_loss(s, t, old, 0.1, 0.04).item(), abs=1e-5)
    model.train()  # BN now uses batch statistics; the tiny CNN's outputs change
    with torch.no_grad():
        t = model.teacher_head(model.teacher_backbone(torch.cat(views))).chunk(2)
    model(Batch(views))
    expected = 0.9 * old + 0.1 * torch.cat(t).mean(0, keepdim=True)
    assert torch.allclose(model.center, expected, atol=1e-5)


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(shape, generator=g) for shape in ((8, 6), (8, 6), (1, 6)))


def _center_rank_fn(r: int) -> dict:
    t1, t2, center = _data()
    rows = slice(0, 3) if r == 0 else slice(3, 8)  # unequal halves: global count, not R * n
    return {"center": ema_center(center, [t1[rows], t2[rows]], 0.9)}


def test_center_across_two_processes_equals_single_process(tmp_path):
    results = run_on_ranks(_center_rank_fn, 2, tmp_path)
    t1, t2, center = _data()
    expected = ema_center(center, [t1, t2], 0.9)
    for res in results:
        assert torch.allclose(res["center"], expected, atol=1e-6)


# --- schedules and the hooks around the optimiser step -----------------------------------


def test_teacher_temperature_warms_up_linearly_in_steps():
    assert teacher_temperature(0, 10, 0.04, 0.07) == pytest.approx(0.04)
    assert teacher_temperature(5, 10, 0.04, 0.07) == pytest.approx(0.055)
    assert teacher_temperature(10, 10, 0.04, 0.07) == pytest.approx(0.07)
    assert teacher_temperature(99, 10, 0.04, 0.07) == pytest.approx(0.07)
    model = _tiny(teacher_temp=0.07, warmup_teacher_temp_epochs=2)
    with pytest.raises(RuntimeError, match="set_schedule"):
        model.current_teacher_temp()
    model.set_schedule(steps_per_epoch=5, total_steps=50)  # warm-up: 10 steps
    assert model(Batch(_views())).logs["teacher_temp"].item() == pytest.approx(0.04)
    model.after_optimizer_step(4, 50)  # 5 steps done: mid-warm-up
    assert model(Batch(_views())).logs["teacher_temp"].item() == pytest.approx(0.055)
    model.after_optimizer_step(9, 50)
    assert model.current_teacher_temp() == pytest.approx(0.07)
    model.after_optimizer_step(30, 50)
    assert model.current_teacher_temp() == pytest.approx(0.07)
    assert _tiny().current_teacher_temp() == 0.04  # official defaults: constant 0.04


def test_last_layer_is_frozen_during_the_first_epoch_only():
    model = _tiny(freeze_last_layer=1)
    model.set_schedule(steps_per_epoch=2, total_steps=6)
    opt = torch.optim.SGD(model.parameter_groups(0.1), lr=0.1, momentum=0.9)
    first_mlp = model.head.mlp[0].weight
    for step in range(2):
        v, w = _last_v(model).detach().clone(), first_mlp.detach().clone()
        _train_step(model, opt, step, 6)
        assert torch.equal(_last_v(model), v)  # no gradient step, no weight decay
        assert not torch.equal(first_mlp, w)  # the rest of the student trains
    v = _last_v(model).detach().clone()
    _train_step(model, opt, 2, 6)
    assert not torch.equal(_last_v(model), v)


def test_clipping_bounds_each_parameter_gradient_norm():
    model = _tiny(clip_grad=3.0, freeze_last_layer=0)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape, generator=g) * (100.0 if i % 2 else 1e-3)
    before = [p.grad.clone() for p in params]
    model.before_optimizer_step(0)
    for i, (p, old) in enumerate(zip(params, before, strict=True)):
        if i % 2:  # big: clipped to norm 3 along the same direction
            assert p.grad.norm().item() == pytest.approx(3.0, rel=1e-4)
            assert F.cosine_similarity(p.grad.flatten(), old.flatten(), dim=0) > 0.9999
        else:  # small: untouched, whatever the other parameters' norms
            assert torch.equal(p.grad, old)
    unclipped = _tiny(clip_grad=0.0, freeze_last_layer=0)
    p = next(unclipped.parameters())
    p.grad = torch.full_like(p, 100.0)
    unclipped.before_optimizer_step(0)
    assert torch.equal(p.grad, torch.full_like(p, 100.0))


def test_weight_norm_g_stays_one_while_the_prototypes_train():
    model = _tiny(freeze_last_layer=0)
    assert not _last_g(model).requires_grad and torch.equal(_last_g(model), torch.ones(K, 1))
    grouped = {id(p) for group in model.parameter_groups(0.1) for p in group["params"]}
    assert id(_last_g(model)) not in grouped
    opt = torch.optim.AdamW(model.parameter_groups(0.1), lr=0.1)
    v = _last_v(model).detach().clone()
    model.set_schedule(1, 3)
    _train_step(model, opt, 0, 3)
    assert not torch.equal(_last_v(model), v)
    assert torch.equal(_last_g(model), torch.ones(K, 1))
    rows = model.head.last_layer.weight.norm(dim=1)
    assert torch.allclose(rows, torch.ones(K), atol=1e-5)  # unit-norm prototypes
    # norm_last_layer=False: g starts at 1 but is trained.
    assert _last_g(_tiny(norm_last_layer=False)).requires_grad


# --- the method as a whole ---------------------------------------------------------------


def test_teacher_is_a_frozen_copy_left_out_of_the_optimiser():
    model = _tiny()
    assert isinstance(model, SSLMethod) and DINO.requirements(DINO.option_defaults()).local_views
    student = [*model.backbone.parameters(), *model.head.parameters()]
    teacher = [*model.teacher_backbone.parameters(), *model.teacher_head.parameters()]
    for s, t in zip(student, teacher, strict=True):
        assert torch.equal(s, t) and s.data_ptr() != t.data_ptr() and not t.requires_grad
    grouped = {id(p) for group in model.parameter_groups(0.1) for p in group["params"]}
    assert grouped.isdisjoint(id(t) for t in teacher)


@pytest.mark.parametrize("local", [0, 4])
def test_forward_on_global_and_local_views_one_backbone_pass_per_size(local):
    model = _tiny()
    student_inputs, teacher_inputs = [], []
    model.backbone.register_forward_hook(lambda m, i, o: student_inputs.append(i[0].shape))
    model.teacher_backbone.register_forward_hook(lambda m, i, o: teacher_inputs.append(i[0].shape))
    check_forward_backward(model, _views(local), LOGS)
    expected = [(2 * N, 1, 16, 16)] + ([(local * N, 1, 8, 8)] if local else [])
    assert student_inputs == expected
    assert teacher_inputs == [(2 * N, 1, 16, 16)]  # the teacher sees the global crops only


def test_logs_are_consistent_collapse_indicators():
    logs = _tiny()(Batch(_views(local=2))).logs
    assert 0 <= logs["teacher_entropy"].item() <= math.log(K) + 1e-5
    assert logs["kl"].item() >= -1e-5  # loss = teacher entropy + KL(teacher || student)
    assert logs["momentum"].item() == pytest.approx(0.996)


def test_rejects_a_single_global_view():
    with pytest.raises(ValueError, match=r"takes 2 views \(\+ local views\), got 1"):
        _tiny()(Batch(_views()[:1]))


def test_center_and_teacher_survive_a_state_dict_round_trip():
    model = _tiny(freeze_last_layer=0)
    model.set_schedule(2, 10)
    opt = torch.optim.SGD(model.parameter_groups(0.0), lr=0.5)
    _train_step(model, opt, 0, 10)
    _train_step(model, opt, 1, 10)
    assert model.center.abs().sum() > 0 and int(model.steps_done) == 2
    fresh = _tiny(seed=1, freeze_last_layer=0)
    fresh.load_state_dict(model.state_dict())
    for (key, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    assert any(k.startswith("teacher_head.") for k in fresh.state_dict())


def test_registry_builds_dino_with_options():
    model = build_method(
        "dino", backbone="small_cnn", width=0.25, in_channels=1, out_dim=32, teacher_temp=0.07
    )
    assert METHODS["dino"] is DINO and isinstance(model, DINO)
    assert model.head.last_layer.weight.shape[0] == 32 and model.teacher_temp == 0.07
    params = method_params("dino")
    assert params["out_dim"] == 4096 and params["student_temp"] == 0.1
    assert params["clip_grad"] == 3.0 and params["freeze_last_layer"] == 1
    with pytest.raises(ValueError, match="must be > 0"):
        validate_options(DINO, teacher_temp=0.0)
