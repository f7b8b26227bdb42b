"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent: A New Approach to Self-Supervised
Learning", arXiv:2006.07733).

    for x in loader:
        x_a, x_b = two random augmentations of x
        p = q(g(f(x_a))), q(g(f(x_b)))         # online: backbone, projector, predictor
        z = g'(f'(x_a)), g'(f'(x_b))           # target: EMA copy of backbone + projector
        loss = L(p_a, sg(z_b)) + L(p_b, sg(z_a))   # L = 2 - 2 cos, eq. 2 and its symmetric
        loss.backward(); optimizer.step()      # online parameters only
        f', g' <- m f' + (1 - m) f, ...        # m: cosine schedule from base_momentum to 1
"""

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ssl_models.heads import ProjectionHead
from ssl_models.losses.byol import byol_loss
from ssl_models.method import Batch, MethodOutput, MethodRequirements, SSLMethod
from ssl_models.momentum import cosine_momentum, ema_update_, momentum_teacher
from ssl_models.options import AT_LEAST_ONE, PROBABILITY, check_options
from ssl_models.registry import register
from ssl_models.transforms.views import BYOL_VIEWS


@register("byol")
class BYOL(SSLMethod):
    """BYOL: online backbone + projector + predictor regressing a momentum target's projection.

    The projector and predictor are 2-layer MLPs (Linear-BN-ReLU-Linear), the predictor with
    the projector's hidden width, as in the paper (4096 -> 256 there). The target backbone and
    projector start as exact copies of the online ones, never receive gradients, and move
    towards them in :meth:`after_optimizer_step`.

    The symmetric loss is the *sum* of the two directions, as in the paper (section 3.1,
    ``L + L~``) and solo-learn, so it lies in [0, 8]; a mean would just halve the learning
    rate's effect.

    Args:
        backbone: encoder mapping images to (N, feature_dim) features.
        feature_dim: backbone output dimension.
        projection_hidden_dim: hidden width of projector and predictor (4096 in the paper for
            ResNet-50; 1024 suits the small backbones used here).
        projection_dim: output dimension of projector and predictor (256, as in the paper).
        base_momentum: EMA momentum at step 0, raised to 1 by a cosine schedule over training
            (0.996 in the paper at batch 4096; 0.99 is the usual choice for the shorter, smaller
            batch runs here, e.g. solo-learn's CIFAR setting).
    """

    current_momentum: Tensor

    finetune_head = "projector"

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        projection_hidden_dim: int = 1024,
        projection_dim: int = 256,
        base_momentum: float = 0.99,
    ) -> None:
        super().__init__(backbone, feature_dim)
        self.base_momentum = base_momentum
        self.projector = ProjectionHead(feature_dim, projection_hidden_dim, projection_dim)
        self.predictor = ProjectionHead(projection_dim, projection_hidden_dim, projection_dim)
        # Separate frozen copies (not a Sequential wrapping the online modules, which would
        # register the online parameters twice in the state dict).
        self.target_backbone = momentum_teacher(self.backbone)
        self.target_projector = momentum_teacher(self.projector)
        # The momentum used by the last EMA update; a buffer so checkpoints keep it.
        self.register_buffer("current_momentum", torch.tensor(base_momentum))

    @classmethod
    def validate(cls, options: Mapping[str, Any]) -> None:
        """Head widths of at least 1 and a base momentum in [0, 1]."""
        check_options(
            options,
            projection_hidden_dim=AT_LEAST_ONE,
            projection_dim=AT_LEAST_ONE,
            base_momentum=PROBABILITY,
        )

    @classmethod
    def requirements(cls, options: Mapping[str, Any]) -> MethodRequirements:
        """Two global views of whole images, asymmetric: BYOL's own (Grill et al. 2020,
        table 6); global BN."""
        return MethodRequirements(views=BYOL_VIEWS, global_bn=True)

    def loss(self, batch: Batch) -> MethodOutput:
        """BYOL's symmetrised loss (eq. 2 both ways): each view's prediction against the
        EMA target's projection of the other view, 2 - 2 cos each, no gradient to the target."""
        views = batch.views
        # One pass per network over both views; batch-norm statistics cover both views.
        p_a, p_b = self.embed_views(views, self.projector, self.predictor)
        with torch.no_grad():
            z_a, z_b = self.target_projector(self.target_backbone(torch.cat(views))).chunk(2)
        loss = byol_loss(p_a, z_b) + byol_loss(p_b, z_a)
        return MethodOutput(
            loss=loss,
            logs={"loss": loss.detach(), "momentum": self.current_momentum.detach().clone()},
        )

    @torch.no_grad()
    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """EMA-update the target with ``m = cosine_momentum(step, total_steps, base)``.

        ``step`` is the index of the optimiser step just taken (0 for the first), so the
        first update uses ``base_momentum`` and ``m`` reaches 1 at ``step == total_steps``.
        """
        m = cosine_momentum(step, total_steps, self.base_momentum)
        ema_update_(self.target_backbone, self.backbone, m)
        ema_update_(self.target_projector, self.projector, m)
        self.current_momentum.fill_(m)
