"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers",
arXiv:2104.14294), Algorithm 1 with multi-crop:

    gt.params = gs.params                    # teacher: EMA copy of backbone + DINO head
    for x in loader:
        x_1, x_2, l_1 .. l_L = global and local crops of x
        s = gs(x_1, x_2, l_1, .., l_L)       # student: every crop, one pass per resolution
        t = gt(x_1, x_2)                     # teacher: global crops only, no gradient
        loss = mean_{i in {1,2}, j != i} H(t_i, s_j)      # see ssl_models.losses.dino
        loss.backward()
        clip each parameter's gradient norm to clip_grad; drop the last layer's gradient
            during the first freeze_last_layer epochs
        update(gs)                           # optimiser step
        gt.params = m * gt.params + (1 - m) * gs.params   # m: cosine from 0.996 to 1
        C = c * C + (1 - c) * mean(t)                      # centre, c = center_momentum
"""

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models.losses.dino import dino_loss, ema_center, mean_entropy, teacher_temperature
from ssl_models.method import Batch, MethodOutput, MethodRequirements, SSLMethod, encode_views
from ssl_models.momentum import cosine_momentum, ema_update_, momentum_teacher
from ssl_models.options import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, PROBABILITY, check_options
from ssl_models.registry import register
from ssl_models.transforms.views import DINO_VIEWS


class DINOHead(nn.Module):
    """The official ``DINOHead``: 3-layer MLP (GELU, optional BN) to a bottleneck, L2
    normalisation, then a weight-normalised linear layer to ``out_dim`` prototypes whose
    norm g starts at 1 and, with ``norm_last_layer``, stays 1 (not trained)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int,
        bottleneck_dim: int,
        *,
        use_bn: bool,
        norm_last_layer: bool,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for dim_in, dim_out in ((in_dim, hidden_dim), (hidden_dim, hidden_dim)):
            norm = [nn.BatchNorm1d(dim_out)] if use_bn else []
            layers += [nn.Linear(dim_in, dim_out), *norm, nn.GELU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp.modules():  # official init: truncated normal, std 0.02, zero bias
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.last_layer = nn.utils.parametrizations.weight_norm(last)
        g = self.last_layer.parametrizations.weight.original0  # (out_dim, 1) row norms
        nn.init.ones_(g)  # under no_grad, like the official weight_g.data.fill_(1)
        g.requires_grad_(not norm_last_layer)  # frozen: param_groups and DDP skip it

    def forward(self, x: Tensor) -> Tensor:
        """Backbone features (N, in_dim) -> prototype scores (N, out_dim): MLP, L2
        normalisation of the bottleneck, weight-normalised last layer."""
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


@register("dino")
class DINO(SSLMethod):
    """DINO: a student matches an EMA teacher's centred, sharpened prototype distribution.

    Args:
        backbone: encoder mapping images to (N, feature_dim) features.
        feature_dim: backbone output dimension.
        out_dim: prototypes K. The paper uses 65536 for ImageNet; 4096 (65536 / 16, as in
            solo-learn's CIFAR recipe) suits datasets of ~10^4-10^5 images, where 65536
            exceeds the image count and its 256 x 65536 last layer dwarfs a small backbone.
        head_hidden_dim, bottleneck_dim: MLP width and bottleneck (2048 and 256, the paper's).
        use_bn_in_head: BN in the head's hidden layers (official default False).
        norm_last_layer: keep the prototypes' weight-norm g at 1 (official default True).
        student_temp: tau_s (0.1).
        teacher_temp, warmup_teacher_temp, warmup_teacher_temp_epochs: tau_t rises linearly
            from warmup_teacher_temp to teacher_temp over that many epochs. Defaults are the
            official code's (0.04, 0.04, 0: constant); the paper's long runs use 0.04 -> 0.07
            over 30 epochs, and the code warns that above 0.07 training is unstable.
        center_momentum: EMA rate of the centre (0.9).
        base_momentum: teacher EMA momentum at step 0, cosine to 1 (0.996; the official code
            suggests 0.9995 for batches of 256).
        clip_grad: per-parameter gradient-norm bound (3.0); 0 disables clipping.
        freeze_last_layer: epochs during which the last layer is not updated (1).
    """

    center: Tensor
    current_momentum: Tensor
    steps_done: Tensor

    finetune_head = "head"

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        out_dim: int = 4096,
        head_hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        use_bn_in_head: bool = False,
        norm_last_layer: bool = True,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        center_momentum: float = 0.9,
        base_momentum: float = 0.996,
        clip_grad: float = 3.0,
        freeze_last_layer: int = 1,
    ) -> None:
        super().__init__(backbone, feature_dim)
        self.student_temp, self.teacher_temp = student_temp, teacher_temp
        self.warmup_teacher_temp = warmup_teacher_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.center_momentum, self.base_momentum = center_momentum, base_momentum
        self.clip_grad, self.freeze_last_layer = clip_grad, freeze_last_layer
        self.head = DINOHead(
            feature_dim,
            out_dim,
            head_hidden_dim,
            bottleneck_dim,
            use_bn=use_bn_in_head,
            norm_last_layer=norm_last_layer,
        )
        self.teacher_backbone = momentum_teacher(self.backbone)
        self.teacher_head = momentum_teacher(self.head)
        # Buffers, so checkpoints resume the centre, the logged momentum and the schedule.
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("current_momentum", torch.tensor(base_momentum))
        self.register_buffer("steps_done", torch.tensor(0, dtype=torch.long))

    def current_teacher_temp(self) -> float:
        """tau_t for the step being computed (``steps_done`` optimiser steps so far)."""
        if self.warmup_teacher_temp_epochs == 0:
            return self.teacher_temp
        warmup_steps = self.steps_in(self.warmup_teacher_temp_epochs)
        step = int(self.steps_done)
        return teacher_temperature(step, warmup_steps, self.warmup_teacher_temp, self.teacher_temp)

    @classmethod
    def validate(cls, options: Mapping[str, Any]) -> None:
        """Head sizes of at least 1, positive temperatures, momenta in [0, 1], and
        non-negative warm-up epochs, clipping bound and last-layer freeze."""
        check_options(
            options,
            out_dim=AT_LEAST_ONE,
            head_hidden_dim=AT_LEAST_ONE,
            bottleneck_dim=AT_LEAST_ONE,
            student_temp=POSITIVE,
            teacher_temp=POSITIVE,
            warmup_teacher_temp=POSITIVE,
            warmup_teacher_temp_epochs=NON_NEGATIVE,
            center_momentum=PROBABILITY,
            base_momentum=PROBABILITY,
            clip_grad=NON_NEGATIVE,
            freeze_last_layer=NON_NEGATIVE,
        )

    @classmethod
    def requirements(cls, options: Mapping[str, Any]) -> MethodRequirements:
        """Two global views, then any local (multi-crop) views; any backbone. The official
        recipe's three kinds of view: BYOL's asymmetric global pair, local crops blurred
        with p=0.5."""
        return MethodRequirements(local_views=True, views=DINO_VIEWS)

    def loss(self, batch: Batch) -> MethodOutput:
        """DINO's multi-crop cross-entropy: every crop's student distribution against the
        centred, sharpened teacher distribution of each global view other than itself."""
        views = batch.views
        student = self.embed_views(views, self.head)  # every crop, one pass per size
        with torch.no_grad():
            teacher = encode_views(self.teacher_backbone, views[:2], self.teacher_head).chunk(2)
        temp = self.current_teacher_temp()
        loss = dino_loss(student, teacher, self.center, self.student_temp, temp)
        entropy = mean_entropy(teacher, self.center, temp)
        if self.training:  # after the loss, which uses the previous centre (as official)
            self.center.copy_(ema_center(self.center, teacher, self.center_momentum))
        logs = {
            "loss": loss.detach(),
            "teacher_temp": torch.tensor(temp),
            "momentum": self.current_momentum.detach().clone(),
            "teacher_entropy": entropy,
            "kl": loss.detach() - entropy,  # -> 0 under collapse of either kind
        }
        return MethodOutput(loss=loss, logs=logs)

    @torch.no_grad()
    def before_optimizer_step(self, step: int) -> None:
        """Official order: clip each gradient to norm ``clip_grad``, then cancel the last
        layer's gradient in the first ``freeze_last_layer`` epochs (``grad = None``: the
        optimiser skips it entirely, no momentum or weight decay either)."""
        if self.clip_grad > 0:
            for p in self.parameters():
                if p.grad is not None:  # no .item(): no host sync per parameter on GPU
                    norm = torch.linalg.vector_norm(p.grad)
                    p.grad.mul_((self.clip_grad / (norm + 1e-6)).clamp(max=1.0))
        if self.freeze_last_layer > 0 and step < self.steps_in(self.freeze_last_layer):
            for p in self.head.last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """EMA-update the teacher (backbone and head) with the cosine-scheduled momentum."""
        m = cosine_momentum(step, total_steps, self.base_momentum)
        ema_update_(self.teacher_backbone, self.backbone, m)
        ema_update_(self.teacher_head, self.head, m)
        self.current_momentum.fill_(m)
        self.steps_done.fill_(step + 1)
