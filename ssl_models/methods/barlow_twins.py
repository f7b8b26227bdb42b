"""Barlow Twins (Zbontar et al. 2021, "Barlow Twins: Self-Supervised Learning via Redundancy
Reduction", arXiv:2103.03230).

    for x in loader:
        y_a, y_b = two random augmentations of x
        z_a, z_b = g(f(y_a)), g(f(y_b))        # f: backbone (kept), g: projector (dropped)
        z_a_norm = (z_a - z_a.mean(0)) / z_a.std(0)      # over the global batch
        z_b_norm = (z_b - z_b.mean(0)) / z_b.std(0)
        c = z_a_norm.T @ z_b_norm / N                     # (d, d) cross-correlation
        loss = sum((1 - diag(c))^2) + lambda * sum(offdiag(c)^2)

No negatives, no momentum encoder, no stop-gradient: collapse is prevented by pushing the
cross-correlation towards the identity (invariance on the diagonal, redundancy reduction
off it).
"""

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import nn

from ssl_models.heads import ProjectionHead
from ssl_models.losses.barlow_twins import BarlowTwinsLoss
from ssl_models.method import Batch, MethodOutput, MethodRequirements, SSLMethod
from ssl_models.options import AT_LEAST_ONE, NON_NEGATIVE, check_options
from ssl_models.registry import register
from ssl_models.transforms.views import BYOL_VIEWS


@register("barlow_twins")
class BarlowTwins(SSLMethod):
    """Barlow Twins: backbone, 3-layer projector, cross-correlation loss.

    Args:
        backbone: encoder mapping images to (N, feature_dim) features.
        feature_dim: backbone output dimension.
        projection_hidden_dim: width of the projector's two hidden layers.
        projection_dim: projector output dimension d (the cross-correlation is d x d).
            The paper uses 8192-8192-8192 on ImageNet and finds quality still rising with
            width; 2048-2048 is solo-learn's CIFAR setting and keeps the d x d matrix (and
            its all-reduce) affordable on CPU and small GPUs.
        lambda_offdiag: weight of the off-diagonal term (paper: 0.0051, tuned for d = 8192
            and reused unchanged by solo-learn at d = 2048).
    """

    finetune_head = "projector"

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 2048,
        lambda_offdiag: float = 0.0051,
    ) -> None:
        super().__init__(backbone, feature_dim)
        # Paper: (Linear-BN-ReLU) x 2, then Linear. The last bias is cancelled by the
        # loss's standardisation, so it is harmless.
        self.projector = ProjectionHead(
            feature_dim, projection_hidden_dim, projection_dim, num_layers=3
        )
        self.criterion = BarlowTwinsLoss(lambda_offdiag)

    @classmethod
    def validate(cls, options: Mapping[str, Any]) -> None:
        """Head widths of at least 1 and an off-diagonal weight lambda >= 0."""
        check_options(
            options,
            projection_hidden_dim=AT_LEAST_ONE,
            projection_dim=AT_LEAST_ONE,
            lambda_offdiag=NON_NEGATIVE,
        )

    @classmethod
    def requirements(cls, options: Mapping[str, Any]) -> MethodRequirements:
        """Two global views of whole images, asymmetric: BYOL's recipe (and global BN), as in the
        official code's Transform."""
        return MethodRequirements(views=BYOL_VIEWS, global_bn=True)

    def loss(self, batch: Batch) -> MethodOutput:
        """The Barlow Twins loss (eq. 1) of the two views' projections: the cross-correlation
        of the batch-standardised embeddings pushed towards the identity."""
        views = batch.views
        z_a, z_b = self.embed_views(views, self.projector)  # z = g(f(y)), one pass
        loss = self.criterion(z_a, z_b)
        pos_sim = F.cosine_similarity(z_a, z_b, dim=1).mean()
        return MethodOutput(loss=loss, logs={"loss": loss.detach(), "pos_sim": pos_sim.detach()})
