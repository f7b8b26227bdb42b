"""One optimiser step of the training loop and what it needs: the optimiser, normalised
inputs and mixed precision. ``benchmarks/method_steps.py`` times these same functions."""

from __future__ import annotations

import torch

from pipeline.config import Config
from pipeline.data.ingest import normalize
from ssl_models import SSLMethod
from ssl_models.method import Batch, MethodOutput
from ssl_models.optim import build_optimizer, scaled_lr


def amp_enabled(config: Config, device: torch.device) -> bool:
    """Whether steps run under bf16 autocast: on CUDA, unless ``train.amp`` is off."""
    return device.type == "cuda" and config.train.amp


def model_inputs(
    uint8_views: list[torch.Tensor],
    mean: torch.Tensor,
    std: torch.Tensor,
    memory_format: torch.memory_format,
) -> list[torch.Tensor]:
    """Normalised float views in ``memory_format`` (channels-last on GPU); tiles and patches
    (N, P, C, h, w) stay contiguous, as channels-last is defined for 4-D tensors only."""
    return [
        normalize(view, mean, std).contiguous(
            memory_format=memory_format if view.ndim == 4 else torch.contiguous_format
        )
        for view in uint8_views
    ]


def optimizer_for(config: Config, method: SSLMethod) -> tuple[torch.optim.Optimizer, float]:
    """The config's optimiser over the method's parameter groups, and its peak learning rate
    (``train.base_lr`` scaled to the global batch size)."""
    lr = scaled_lr(config.train.base_lr, config.train.batch_size)
    optimizer = build_optimizer(
        config.train.optimizer,
        method.parameter_groups(config.train.weight_decay),
        lr=lr,
        weight_decay=config.train.weight_decay,
        momentum=config.train.momentum,
        lars_eta=config.train.lars_eta,
    )
    return optimizer, lr


def train_step(
    model: torch.nn.Module,
    method: SSLMethod,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    use_amp: bool,
    step: int,
    total_steps: int,
) -> MethodOutput:
    """One optimiser step: forward (bf16 autocast when ``use_amp``) through ``model`` (the
    method, DDP-wrapped on more than one worker), backward, and the method's hooks."""
    with torch.autocast(batch.views[0].device.type, dtype=torch.bfloat16, enabled=use_amp):
        output = model(batch)
    optimizer.zero_grad(set_to_none=True)
    output.loss.backward()
    method.before_optimizer_step(step)
    optimizer.step()
    method.after_optimizer_step(step, total_steps)
    return output
