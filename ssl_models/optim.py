"""Optimisers and learning-rate schedules for self-supervised pretraining.

- :class:`LARS`: SGD with momentum whose per-layer step is scaled by a trust ratio
  (You et al. 2017, "Large Batch Training of Convolutional Networks", arXiv:1708.03888), the
  optimiser SimCLR uses for large batches.
- :func:`param_groups`: biases and normalisation parameters (and a ViT's position embeddings
  and CLS token) get no weight decay and no trust ratio, as in SimCLR, BYOL, solo-learn and
  DeiT.
- :func:`warmup_cosine` and :func:`scaled_lr`: SimCLR's schedule and linear scaling rule;
  :func:`set_lr` applies a scheduled rate to an optimiser.
"""

import math
from collections.abc import Callable, Iterable
from typing import Any, overload

import torch
from torch import nn
from torch.optim import Optimizer


class LARS(Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling.

    For each parameter w with gradient g::

        d     = g + weight_decay * w
        trust = eta * ||w|| / ||d||          (1 when either norm is 0)
        buf   = momentum * buf + trust * d
        w     = w - lr * buf

    A group that sets ``exclude_from_lars`` skips the trust ratio (trust = 1), which makes its
    update exactly ``torch.optim.SGD`` with momentum and its own weight decay; as in SimCLR's
    LARS, decay and adaptation are excluded separately (biases and norms get
    ``weight_decay=0`` from :func:`param_groups`, DeepCluster's classifier keeps its decay).

    ``eta`` defaults to 0.001, the paper's value and the one in SimCLR's and Barlow Twins'
    reference code, which pair it with ``lr = base_lr * batch / 256``. (solo-learn uses 0.02
    together with clipping the trust ratio at 1.)
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "eta": eta,
            "exclude_from_lars": False,
        }
        super().__init__(params, defaults)

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter with a gradient; ``closure`` re-evaluates the loss
        (returned), as for any ``torch.optim`` optimiser."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad.add(p, alpha=group["weight_decay"])
                if not group["exclude_from_lars"]:
                    p_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d_p)
                    trust = torch.where(
                        (p_norm > 0) & (d_norm > 0), group["eta"] * p_norm / d_norm, 1.0
                    )
                    d_p = d_p * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d_p.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d_p)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def _no_weight_decay_names(model: nn.Module) -> set[str]:
    # timm's convention: a submodule's no_weight_decay() names some of its own parameters.
    names: set[str] = set()
    for prefix, module in model.named_modules():
        hook = getattr(module, "no_weight_decay", None)
        if callable(hook):
            names |= {f"{prefix}.{name}" if prefix else name for name in hook()}
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into weights and {biases, normalisation parameters}.

    Parameters with ``ndim <= 1`` (biases, BatchNorm/LayerNorm scales and shifts) form the
    second group, with ``weight_decay=0`` and ``exclude_from_lars=True``: decaying or
    trust-scaling them hurts accuracy and buys nothing. So do the parameters a submodule
    names in a ``no_weight_decay()`` method (timm's convention; a ViT's position embeddings
    and CLS token, as in DeiT). Empty groups are left out.
    """
    no_decay = _no_weight_decay_names(model)
    regular: list[nn.Parameter] = []
    excluded: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (excluded if p.ndim <= 1 or name in no_decay else regular).append(p)
    groups = [
        {"params": regular, "weight_decay": weight_decay, "exclude_from_lars": False},
        {"params": excluded, "weight_decay": 0.0, "exclude_from_lars": True},
    ]
    return [g for g in groups if g["params"]]


OPTIMIZERS: dict[str, type[Optimizer]] = {
    "sgd": torch.optim.SGD,
    "lars": LARS,
    "adamw": torch.optim.AdamW,
}


def build_optimizer(
    name: str,
    params: Iterable[Any],
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    lars_eta: float = 0.001,
) -> Optimizer:
    """Build an optimiser by name; ``params`` may be tensors or :func:`param_groups` output.

    Per-group ``weight_decay`` overrides the default given here. AdamW ignores ``momentum``;
    only LARS uses ``lars_eta``.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; available: {sorted(OPTIMIZERS)}")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "lars":
        return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=lars_eta)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def warmup_cosine(
    step: int, total_steps: int, warmup_steps: int, base_lr: float, final_lr: float = 0.0
) -> float:
    """Learning rate at ``step``: linear warm-up, then cosine decay to ``final_lr``.

    Warm-up gives ``base_lr * (step + 1) / warmup_steps`` so the first step already moves;
    it reaches ``base_lr`` at ``step = warmup_steps - 1``, and the cosine reaches ``final_lr``
    at ``step = total_steps`` (and stays there after).
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_lr + 0.5 * (base_lr - final_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float, base_lr: float | None = None) -> None:
    """Give every parameter group ``lr``, except that a group marked ``"fixed_lr"`` (SimSiam's
    predictor, see ``SSLMethod.param_groups``) keeps ``base_lr``."""
    for group in optimizer.param_groups:
        fixed = group.get("fixed_lr") and base_lr is not None
        group["lr"] = base_lr if fixed else lr


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """SimCLR's linear scaling rule: ``base_lr * global_batch / 256``."""
    return base_lr * global_batch / 256
