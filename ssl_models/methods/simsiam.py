"""SimSiam (Chen & He 2021, "Exploring Simple Siamese Representation Learning",
arXiv:2011.10566).

    for x in loader:
        x_1, x_2 = two random augmentations of x
        z_1, z_2 = g(f(x_1)), g(f(x_2))        # backbone + projector (shared weights)
        p_1, p_2 = h(z_1), h(z_2)              # predictor
        loss = D(p_1, sg(z_2)) / 2 + D(p_2, sg(z_1)) / 2   # D = -cos, sg = stop-gradient

No negatives and no momentum encoder: the stop-gradient is what prevents collapse (paper
section 4.1), and the predictor's learning rate is kept fixed (section 4.4).
"""

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.heads import ProjectionHead
from ssl_models.losses.cosine import negative_cosine_similarity
from ssl_models.method import Batch, MethodOutput, SSLMethod
from ssl_models.optim import param_groups
from ssl_models.options import AT_LEAST_ONE, AT_LEAST_TWO, check_options
from ssl_models.registry import register


@register("simsiam")
class SimSiam(SSLMethod):
    """SimSiam: projector with batch norm on every layer, bottleneck predictor, stop-gradient.

    The projector is Linear-BN-ReLU blocks ending in Linear-BN, where the output BN has no
    affine parameters (as in the paper's code). ``projection_layers=2`` is the paper's CIFAR
    variant (appendix D) and the default here, since our backbones and images are CIFAR-sized;
    ``3`` gives the ImageNet projector (section 3). The predictor is Linear(d, h)-BN-ReLU-
    Linear(h, d) with no BN on its output and a bottleneck ``h = d / 4``.

    Args:
        backbone: encoder mapping images to (N, feature_dim) features.
        feature_dim: backbone output dimension.
        projection_dim: projector hidden and output width d (2048 in the paper; 512 suits the
            small backbones used here).
        predictor_hidden_dim: predictor bottleneck width h (paper: d / 4, i.e. 128 for 512).
        projection_layers: linear layers in the projector (2: CIFAR variant, 3: ImageNet).
    """

    finetune_head = "projector"

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        projection_dim: int = 512,
        predictor_hidden_dim: int = 128,
        projection_layers: int = 2,
    ) -> None:
        super().__init__(backbone, feature_dim)
        self.projector = ProjectionHead(
            feature_dim, projection_dim, projection_dim, num_layers=projection_layers, last_bn=True
        )
        self.predictor = ProjectionHead(projection_dim, predictor_hidden_dim, projection_dim)

    @classmethod
    def validate(cls, options: Mapping[str, Any]) -> None:
        """Head widths of at least 1 and a projector of at least 2 layers."""
        check_options(
            options,
            projection_dim=AT_LEAST_ONE,
            predictor_hidden_dim=AT_LEAST_ONE,
            projection_layers=AT_LEAST_TWO,
        )

    def loss(self, batch: Batch) -> MethodOutput:
        """SimSiam's symmetrised loss: each view's prediction against the other
        view's projection, negative cosine, stop-gradient on the projection."""
        views = batch.views
        # One pass over both views; batch-norm statistics cover both views.
        z = self.projector(self.backbone(torch.cat(views)))
        p_1, p_2 = self.predictor(z).chunk(2)
        z_1, z_2 = z.detach().chunk(2)  # stop-gradient on the target branch
        loss = negative_cosine_similarity(p_1, z_2) / 2 + negative_cosine_similarity(p_2, z_1) / 2
        # Collapse indicator (paper section 4.1, fig. 2): per-dimension std of the l2-normalised
        # projections, averaged over dimensions and views; ~1/sqrt(d) when healthy, 0 collapsed.
        z_std = torch.stack([F.normalize(v.float(), dim=1).std(dim=0).mean() for v in (z_1, z_2)])
        return MethodOutput(loss=loss, logs={"loss": loss.detach(), "z_std": z_std.mean()})

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """The usual weight / no-decay split, with the predictor's groups on a fixed lr."""
        rest = nn.ModuleDict(
            {name: m for name, m in self.named_children() if m is not self.predictor}
        )
        groups = param_groups(rest, weight_decay)
        for group in param_groups(self.predictor, weight_decay):
            groups.append({**group, "fixed_lr": True})
        return groups
