"""VICReg (Bardes, Ponce and LeCun 2022, "VICReg: Variance-Invariance-Covariance
Regularization for Self-Supervised Learning", arXiv:2105.04906).

    for x in loader:
        y_a, y_b = two random augmentations of x
        z_a, z_b = g(f(y_a)), g(f(y_b))        # f: backbone (kept), g: expander (dropped)
        inv = mse(z_a, z_b)                                       # invariance
        var = mean(relu(1 - std(z_a))) / 2 + mean(relu(1 - std(z_b))) / 2   # variance
        cov = offdiag(cov(z_a))^2.sum() / d + offdiag(cov(z_b))^2.sum() / d # covariance
        loss = 25 * inv + 25 * var + 1 * cov

Statistics are over the global batch. The variance hinge keeps every dimension's standard
deviation above 1 (no collapse) and the covariance term decorrelates the dimensions; no
negatives, momentum encoder or stop-gradient are needed.
"""

from collections.abc import Mapping
from typing import Any

from torch import nn

from ssl_models.heads import ProjectionHead
from ssl_models.losses.vicreg import VICRegLoss
from ssl_models.method import Batch, MethodOutput, MethodRequirements, SSLMethod
from ssl_models.options import AT_LEAST_ONE, NON_NEGATIVE, check_options
from ssl_models.registry import register
from ssl_models.transforms.views import BYOL_VIEWS


@register("vicreg")
class VICReg(SSLMethod):
    """VICReg: backbone, 3-layer expander, variance-invariance-covariance loss.

    Args:
        backbone: encoder mapping images to (N, feature_dim) features.
        feature_dim: backbone output dimension.
        projection_hidden_dim: width of the expander's two hidden layers.
        projection_dim: expander output dimension d. The paper uses 8192-8192-8192 on
            ImageNet; 2048-2048 is solo-learn's CIFAR setting and keeps the d x d covariance
            affordable on CPU and small GPUs.
        sim_weight: invariance weight (paper: 25).
        var_weight: variance weight (paper: 25).
        cov_weight: covariance weight (paper: 1).
    """

    finetune_head = "projector"

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 2048,
        sim_weight: float = 25.0,
        var_weight: float = 25.0,
        cov_weight: float = 1.0,
    ) -> None:
        super().__init__(backbone, feature_dim)
        # Paper's expander: (Linear-BN-ReLU) x 2, then Linear.
        self.projector = ProjectionHead(
            feature_dim, projection_hidden_dim, projection_dim, num_layers=3
        )
        self.criterion = VICRegLoss(sim_weight, var_weight, cov_weight)

    @classmethod
    def validate(cls, options: Mapping[str, Any]) -> None:
        """Head widths of at least 1 and non-negative term weights."""
        check_options(
            options,
            projection_hidden_dim=AT_LEAST_ONE,
            projection_dim=AT_LEAST_ONE,
            sim_weight=NON_NEGATIVE,
            var_weight=NON_NEGATIVE,
            cov_weight=NON_NEGATIVE,
        )

    @classmethod
    def requirements(cls, options: Mapping[str, Any]) -> MethodRequirements:
        """Two global views of whole images, asymmetric: BYOL's recipe (and global BN), as in the
        official code's TrainTransform."""
        return MethodRequirements(views=BYOL_VIEWS, global_bn=True)

    def loss(self, batch: Batch) -> MethodOutput:
        """VICReg's loss of the two views' embeddings: weighted invariance (MSE),
        variance (hinge on each dimension's std) and covariance (off-diagonal) terms."""
        views = batch.views
        z_a, z_b = self.embed_views(views, self.projector)  # z = g(f(y)), one pass
        loss, parts = self.criterion(z_a, z_b)
        return MethodOutput(loss=loss, logs={"loss": loss.detach(), **parts})
