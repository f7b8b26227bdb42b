"""The DINO self-distillation loss, its centre and its teacher-temperature schedule.

Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers",
arXiv:2104.14294, Algorithm 1 and the official ``DINOLoss``:

    def H(t, s):                       # t: teacher logits, s: student logits, both (n, K)
        t = softmax((t - C) / tau_t)   # centre, then sharpen (tau_t < tau_s)
        s = log_softmax(s / tau_s)
        return -(t * s).sum(1).mean()

    loss = mean over pairs (i, j), i in global views, j in all views, i != j, of H(t_i, s_j)
    C = m * C + (1 - m) * mean(t_1, t_2)   # after the loss; mean over the GLOBAL batch

Centring alone would collapse to a uniform output and sharpening alone to a one-hot one;
together they balance (paper section 5.3). The centre is a batch statistic: the mean is
all-reduced (summed across workers, divided by the global row count) so every worker keeps
the same centre, as the official ``update_center`` does. It takes no gradient.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_models.dist import all_reduce_sum_with_grad


def dino_loss(
    student: Sequence[Tensor],
    teacher: Sequence[Tensor],
    center: Tensor,
    student_temp: float,
    teacher_temp: float,
) -> Tensor:
    """Mean cross-entropy between centred, sharpened teacher and student distributions.

    Args:
        student: one (n, K) logit tensor per view, global views first, in the order the
            teacher's views come in (student view i and teacher view i are the same crop).
        teacher: one (n, K) logit tensor per global view; treated as constants.
        center: (K,) or (1, K) centre subtracted from the teacher logits.
        student_temp: student softmax temperature tau_s (0.1 in the paper).
        teacher_temp: teacher softmax temperature tau_t (0.04-0.07 in the paper).
    """
    if len(student) < 2 or not 1 <= len(teacher) <= len(student):
        raise ValueError(f"need >= 2 student views and 1..{len(student)} teacher views")
    # Float32 whatever the autocast dtype: logits divided by 0.04 lose too much in bf16.
    targets = [F.softmax((t.detach().float() - center) / teacher_temp, dim=-1) for t in teacher]
    log_probs = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student]
    total, pairs = log_probs[0].new_zeros(()), 0
    for i, target in enumerate(targets):
        for j, log_prob in enumerate(log_probs):
            if i == j:  # a crop predicting itself carries no signal; the paper skips it
                continue
            total = total + torch.sum(-target * log_prob, dim=-1).mean()
            pairs += 1
    return total / pairs


@torch.no_grad()
def teacher_batch_center(teacher: Sequence[Tensor]) -> Tensor:
    """(1, K) mean of the teacher logits over every global view and the GLOBAL batch: row
    sums and the row count are summed over workers in one collective (any per-rank size)."""
    logits = torch.cat([t.float() for t in teacher])
    local = torch.cat([logits.sum(0), logits.new_tensor([float(len(logits))])])
    total = all_reduce_sum_with_grad(local)  # no autograd under no_grad: a plain all-reduce
    return (total[:-1] / total[-1]).unsqueeze(0)


@torch.no_grad()
def ema_center(center: Tensor, teacher: Sequence[Tensor], momentum: float) -> Tensor:
    """The updated centre ``m * C + (1 - m) * batch_mean`` (same on every worker)."""
    return center * momentum + teacher_batch_center(teacher) * (1 - momentum)


def teacher_temperature(step: int, warmup_steps: int, warmup_temp: float, temp: float) -> float:
    """Linear warm-up from ``warmup_temp`` (step 0) to ``temp`` (step ``warmup_steps`` and
    after). The official code steps it once per epoch; per step is the same line, smoother."""
    if step >= warmup_steps:
        return temp
    return warmup_temp + (temp - warmup_temp) * step / warmup_steps


@torch.no_grad()
def mean_entropy(teacher: Sequence[Tensor], center: Tensor, teacher_temp: float) -> Tensor:
    """Mean entropy (nats) of the centred, sharpened teacher distributions: near log K means
    uniform collapse, near 0 one-hot; ``loss - mean_entropy`` is the mean teacher-student KL,
    which is 0 under either collapse (paper Fig. 7)."""
    logits = torch.cat([t.float() for t in teacher])
    log_p = F.log_softmax((logits - center) / teacher_temp, dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()
