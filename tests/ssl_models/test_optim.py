import math

import pytest
import torch
from torch import nn

from ssl_models.optim import (
    LARS,
    build_optimizer,
    param_groups,
    scaled_lr,
    set_lr,
    warmup_cosine,
)


def test_lars_one_step_matches_hand_computation():
    weight = nn.Parameter(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))  # norm 5
    bias = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = LARS(
        [
            {"params": [weight], "weight_decay": 0.1},
            {"params": [bias], "weight_decay": 0.1, "exclude_from_lars": True},
        ],
        lr=0.1,
        momentum=0.9,
        eta=0.02,
    )
    # Weight: g + 0.1 * w = [[0.6, 0], [0, 0.8]] (norm 1), trust = 0.02 * 5 / 1 = 0.1,
    # step = lr * trust * d = 0.01 * d.
    weight.grad = torch.tensor([[0.3, 0.0], [0.0, 0.4]])
    # Bias: excluded from the trust ratio, so SGD with its group's weight decay:
    # d = g + 0.1 * b = [0.6, 0.3], step = lr * d.
    bias.grad = torch.tensor([0.5, 0.5])
    opt.step()
    assert torch.allclose(weight, torch.tensor([[2.994, 0.0], [0.0, 3.992]]))
    assert torch.allclose(bias, torch.tensor([0.94, -2.03]))

    # Second step: d = [0.5 + 0.094, 0.5 - 0.203]; buffer = 0.9 * [0.6, 0.3] + d, times lr.
    bias.grad = torch.tensor([0.5, 0.5])
    weight.grad = None
    opt.step()
    assert torch.allclose(bias, torch.tensor([0.8266, -2.0867]))


def test_lars_default_eta_is_paper_value():
    assert LARS([nn.Parameter(torch.ones(2, 2))], lr=1.0).defaults["eta"] == 0.001


def test_param_groups_split_biases_and_norms():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    regular, excluded = param_groups(model, weight_decay=1e-4)
    assert regular["params"] == [model[0].weight]
    assert regular["weight_decay"] == 1e-4 and not regular["exclude_from_lars"]
    assert {id(p) for p in excluded["params"]} == {
        id(model[0].bias),
        id(model[1].weight),
        id(model[1].bias),
    }
    assert excluded["weight_decay"] == 0.0 and excluded["exclude_from_lars"]


@pytest.mark.parametrize(
    ("name", "cls"), [("sgd", torch.optim.SGD), ("lars", LARS), ("adamw", torch.optim.AdamW)]
)
def test_build_optimizer(name, cls):
    model = nn.Linear(4, 3)
    opt = build_optimizer(name, param_groups(model, 1e-4), lr=0.1, weight_decay=1e-4)
    assert isinstance(opt, cls)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]


def test_build_optimizer_unknown_name_lists_available():
    with pytest.raises(ValueError, match="adamw.*lars.*sgd"):
        build_optimizer("adam", [nn.Parameter(torch.ones(1))], lr=0.1, weight_decay=0.0)


def test_warmup_cosine():
    kwargs = {"total_steps": 110, "warmup_steps": 10, "base_lr": 1.0, "final_lr": 0.1}
    assert warmup_cosine(0, **kwargs) == pytest.approx(0.1)  # base_lr / warmup_steps
    assert warmup_cosine(9, **kwargs) == pytest.approx(1.0)  # end of warm-up
    assert warmup_cosine(10, **kwargs) == pytest.approx(1.0)  # cosine starts at the top
    assert warmup_cosine(60, **kwargs) == pytest.approx(0.55)  # cosine midpoint
    assert warmup_cosine(35, **kwargs) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert warmup_cosine(110, **kwargs) == pytest.approx(0.1)
    assert warmup_cosine(500, **kwargs) == pytest.approx(0.1)


def test_scaled_lr():
    assert scaled_lr(0.3, 4096) == pytest.approx(4.8)
    assert scaled_lr(0.3, 256) == pytest.approx(0.3)


def test_set_lr_keeps_fixed_groups_at_the_base_rate():
    weights = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))]
    groups = [{"params": [weights[0]]}, {"params": [weights[1]], "fixed_lr": True}]
    optimizer = torch.optim.SGD(groups, lr=0.5)
    set_lr(optimizer, 0.1, base_lr=0.5)
    assert [group["lr"] for group in optimizer.param_groups] == [0.1, 0.5]
    set_lr(optimizer, 0.2)  # no base rate: every group follows the schedule
    assert [group["lr"] for group in optimizer.param_groups] == [0.2, 0.2]


def test_param_groups_honour_a_submodules_no_weight_decay_names():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.token = nn.Parameter(torch.zeros(1, 1, 4))
            self.proj = nn.Linear(4, 4)

        def no_weight_decay(self):
            return {"token"}

    model = nn.Sequential(nn.Linear(4, 4), Tokens())
    regular, excluded = param_groups(model, weight_decay=0.1)
    assert regular["params"] == [model[0].weight, model[1].proj.weight]
    assert excluded["params"] == [model[0].bias, model[1].token, model[1].proj.bias]
