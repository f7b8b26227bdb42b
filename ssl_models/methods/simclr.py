"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations", arXiv:2002.05709).

    for x in loader:
        x_a, x_b = two random augmentations of x
        h = f(x_a), f(x_b)                  # backbone features (the representation kept)
        z = g(h)                            # projection head, used only for the loss
        loss = NT-Xent(z_a, z_b)            # other 2N-2 embeddings are the negatives
"""

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import nn

from ssl_models.heads import ProjectionHead
from ssl_models.losses import NTXentLoss
from ssl_models.method import Batch, MethodOutput, MethodRequirements, SSLMethod
from ssl_models.options import AT_LEAST_ONE, POSITIVE, check_options, one_of
from ssl_models.registry import register


@register("simclr")
class SimCLR(SSLMethod):
    """SimCLR: backbone, MLP projector, NT-Xent loss. v1's projector has 2 layers; SimCLR v2
    (Chen et al. 2020b, arXiv:2006.10029, section 2) deepens it to 3 (``projection_layers=3``)
    with batch norm after every layer. Deviation from v2's code: the last layer's batch norm
    has no scale parameter either (here ``BatchNorm1d(affine=False)``, as MoCo v3's).

    Args:
        backbone: encoder mapping images to (N, feature_dim) features.
        feature_dim: backbone output dimension.
        temperature: NT-Xent temperature (0.5 in the paper at batch 4096 on ImageNet; 0.2 is
            the common choice for CIFAR-sized runs, e.g. solo-learn).
        projection_hidden_dim: hidden width of the projector.
        projection_dim: output dimension of the projector.
        projection_layers: linear layers in the projector: 2 (v1) or 3 (v2, with a batch
            norm on its output).
    """

    finetune_head = "projector"

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        temperature: float = 0.2,
        projection_hidden_dim: int = 512,
        projection_dim: int = 128,
        projection_layers: int = 2,
    ) -> None:
        super().__init__(backbone, feature_dim)
        self.projector = ProjectionHead(
            feature_dim,
            projection_hidden_dim,
            projection_dim,
            num_layers=projection_layers,
            last_bn=projection_layers >= 3,
        )
        self.criterion = NTXentLoss(temperature)

    @classmethod
    def validate(cls, options: Mapping[str, Any]) -> None:
        """A positive temperature, head widths of at least 1, a 2- or 3-layer projector."""
        check_options(
            options,
            temperature=POSITIVE,
            projection_hidden_dim=AT_LEAST_ONE,
            projection_dim=AT_LEAST_ONE,
            projection_layers=one_of(2, 3),
        )

    @classmethod
    def requirements(cls, options: Mapping[str, Any]) -> MethodRequirements:
        """Two global views of whole images, one recipe; global BN, as in the paper."""
        return MethodRequirements(global_bn=True)

    def loss(self, batch: Batch) -> MethodOutput:
        """NT-Xent (eq. 1) over the two views' projections: each embedding's positive is
        the other view of its image, the other 2N - 2 embeddings are its negatives."""
        z_a, z_b = self.embed_views(batch.views, self.projector)  # z = g(f(x)), one pass
        loss = self.criterion(z_a, z_b)
        pos_sim = F.cosine_similarity(z_a, z_b, dim=1).mean()
        return MethodOutput(loss=loss, logs={"loss": loss.detach(), "pos_sim": pos_sim.detach()})
