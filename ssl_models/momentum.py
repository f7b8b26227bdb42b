"""Momentum (EMA) teachers, shared by MoCo, BYOL, DINO and friends.

The teacher starts as an exact copy of the student and never receives gradients; after each
optimiser step it moves towards the student, ``t <- m t + (1 - m) s``, with a momentum ``m``
that follows a cosine schedule from its base value up to 1 (BYOL, Grill et al. 2020,
arXiv:2006.07733, section 3.2; MoCo v3, DINO).
"""

import copy
import math

import torch
from torch import nn


def momentum_teacher(student: nn.Module) -> nn.Module:
    """An exact, frozen copy of ``student``."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place ``t = m * t + (1 - m) * s`` for parameters; buffers (BN statistics) are copied."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)
    for teacher_buffer, student_buffer in zip(teacher.buffers(), student.buffers(), strict=True):
        teacher_buffer.copy_(student_buffer)


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """BYOL's schedule: ``final - (final - base) * (cos(pi * step / total) + 1) / 2``."""
    progress = min(1.0, step / max(1, total_steps))
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2
