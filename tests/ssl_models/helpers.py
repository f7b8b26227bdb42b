"""Small builders and a training loop shared by the method tests.

``tiny_backbone`` builds a seeded quarter-width small CNN for 1-channel images,
``noisy_views`` noisy copies of one random batch, and ``train_losses`` trains a method on
such a fixed batch and returns the loss of each step; ``check_forward_backward`` checks
one step's loss, logs and backbone gradients.
"""

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ssl_models import SSLMethod, build_backbone
from ssl_models.method import Batch, MethodOutput


def tiny_backbone(seed: int = 0) -> tuple[nn.Module, int]:
    """``torch.manual_seed(seed)``, then a quarter-width small CNN for 1-channel images."""
    torch.manual_seed(seed)
    return build_backbone("small_cnn", width=0.25, in_channels=1)


def noisy_views(n: int, size: int, seed: int, noise: float = 0.3, count: int = 2) -> list[Tensor]:
    """``count`` views of one random (n, 1, size, size) batch, each with its own noise."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, size, size, generator=g)
    return [images + noise * torch.randn(images.shape, generator=g) for _ in range(count)]


def assert_state_round_trips(model: SSLMethod, fresh: SSLMethod, views: list[Tensor]) -> None:
    """After a training step of ``model``, ``fresh`` loaded with its state dict holds every
    entry exactly and computes the same loss under the same random seed."""
    opt = torch.optim.SGD(model.parameter_groups(0.0), lr=0.1)
    model(Batch(views)).loss.backward()
    opt.step()
    fresh.load_state_dict(model.state_dict())
    for (key, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    torch.manual_seed(5)
    expected = model(Batch(views)).loss
    torch.manual_seed(5)
    assert torch.equal(fresh(Batch(views)).loss, expected)


def train_losses(
    model: SSLMethod,
    views: Sequence[Tensor] | Callable[[], list[Tensor]],
    steps: int = 30,
    lr: float = 0.05,
    params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
    indices: Tensor | None = None,
) -> list[float]:
    """The loss of each of ``steps`` SGD steps (momentum 0.9) on ``params`` (default: all).

    ``views`` is a fixed batch, or a function drawing a new one each step. The hooks are
    called as the pipeline calls them: ``set_schedule(steps, steps)`` first (the run is one
    epoch), ``before_optimizer_step(step)`` and ``after_optimizer_step(step, steps)``.
    """
    opt = torch.optim.SGD(model.parameters() if params is None else params, lr=lr, momentum=0.9)
    model.set_schedule(steps, steps)
    losses = []
    for step in range(steps):
        batch = views() if callable(views) else list(views)
        out = model(Batch(batch)) if indices is None else model(Batch(batch, indices))
        opt.zero_grad()
        out.loss.backward()
        model.before_optimizer_step(step)
        opt.step()
        model.after_optimizer_step(step, steps)
        losses.append(out.loss.item())
    return losses


def check_forward_backward(model: SSLMethod, views: list[Tensor], log_keys: set[str]) -> None:
    """One step's forward and backward: a finite scalar loss, the ``log_keys`` logs, all
    detached, and finite, not all zero gradients on every backbone parameter."""
    assert isinstance(model, SSLMethod)
    out = model(Batch(views))
    assert isinstance(out, MethodOutput)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert set(out.logs) == log_keys
    assert all(not v.requires_grad for v in out.logs.values())
    out.loss.backward()
    grads = [p.grad for p in model.backbone.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def validate_options(cls: type[SSLMethod], **options: Any) -> None:
    """``cls.validate`` on its defaults updated with ``options``: the check that
    ``build_method`` and the run config make before a method is built."""
    cls.validate(cls.option_defaults() | options)
