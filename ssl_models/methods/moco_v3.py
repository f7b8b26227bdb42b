"""MoCo v3 (Chen, Xie, He 2021, "An Empirical Study of Training Self-Supervised Vision
Transformers", arXiv:2104.02057), Algorithm 1:

    f_k.params = f_q.params                  # momentum encoder: backbone + projector copy
    for x in loader:
        x_1, x_2 = aug(x), aug(x)
        q_1, q_2 = f_q(x_1), f_q(x_2)        # backbone + projector + predictor
        k_1, k_2 = f_k(x_1), f_k(x_2)        # no gradient
        loss = ctr(q_1, k_2) + ctr(q_2, k_1)
        loss.backward(); update(f_q)
        f_k = m * f_k + (1 - m) * f_q        # m: cosine schedule from base to 1

    def ctr(q, k):
        k = all_gather(k)                    # keys of the global batch, no gradient
        logits = mm(q, k.t()) / t            # q, k L2-normalised
        labels = range(N) + N * rank         # N: this rank's batch
        return CrossEntropyLoss(logits, labels) * (2 * t)

There is no queue: the other keys of the global batch are the negatives, which is why MoCo v3
wants large batches.
"""

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models.backbones import module_kind
from ssl_models.dist import shuffle_across_ranks, unshuffle_across_ranks
from ssl_models.heads import ProjectionHead
from ssl_models.losses.info_nce import info_nce_loss
from ssl_models.method import Batch, MethodOutput, MethodRequirements, SSLMethod
from ssl_models.momentum import cosine_momentum, ema_update_, momentum_teacher
from ssl_models.options import AT_LEAST_ONE, POSITIVE, PROBABILITY, check_options
from ssl_models.registry import register
from ssl_models.transforms.views import BYOL_VIEWS


@register("moco_v3")
class MoCoV3(SSLMethod):
    """MoCo v3: projector + predictor on the online side, momentum encoder, in-batch InfoNCE.

    Design choices, in the paper's terms:

    - Heads, as the official code builds them for the backbone's kind
      (``moco/builder.py``): for a ViT (built-in or timm) a 3-layer projector and a 2-layer
      predictor, both ending in BN without affine parameters; for a CNN a 2-layer projector
      (output BN) and a 2-layer predictor without output BN (``last_bn=False``). Hidden
      layers are Linear-BN-ReLU. Deviation: the official linear layers have no bias; here
      only a layer followed by BN drops it, so the CNN predictor's last layer has one.
    - Loss: :func:`~ssl_models.losses.info_nce.info_nce_loss` with in-batch negatives, times
      ``2 * t`` as in the official code (which cancels the 1/t of the gradient scale),
      summed over the two directions.
    - Momentum: after each optimiser step, ``m = cosine_momentum(step, total, base)`` rises
      from ``base_momentum`` to 1 and the momentum encoder (backbone + projector) moves
      towards the online one. The official code updates at the start of the next forward,
      before the keys are computed; it is the same update.
    - Batch norm: the official recipe uses SyncBN, so no rank's statistics single out its own
      keys; so does the pipeline by default (``model.sync_bn``, global BN). With per-rank BN
      (``model.sync_bn=false``) keys are encoded with MoCo's shuffled BN instead (a key is
      normalised with statistics of a random sub-batch of the global batch, not its
      query's); in a single process that is a no-op for BN statistics.

    Args:
        backbone: encoder mapping images to (N, feature_dim) features.
        feature_dim: backbone output dimension.
        temperature: softmax temperature t. The paper's ViT recipes use 0.2; the official
            code defaults to 1.0, which its ResNet-50 recipes keep; solo-learn's CIFAR
            configs use 0.2.
        base_momentum: starting momentum of the cosine schedule to 1 (0.99 in the paper and
            the official code; solo-learn's CIFAR configs use 0.99 too).
        projection_hidden_dim: hidden width of the projector and predictor (4096 in the
            paper; 1024 suits the small CPU backbones used here).
        projection_dim: output dimension of the projector and predictor (256 in the paper).
    """

    finetune_head = "projector"

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        temperature: float = 0.2,
        base_momentum: float = 0.99,
        projection_hidden_dim: int = 1024,
        projection_dim: int = 256,
    ) -> None:
        super().__init__(backbone, feature_dim)
        self.temperature = temperature
        self.base_momentum = base_momentum
        self.momentum = base_momentum  # the value of the latest update, for logging
        vit = module_kind(backbone) == "vit"
        self.projector = ProjectionHead(
            feature_dim,
            projection_hidden_dim,
            projection_dim,
            num_layers=3 if vit else 2,
            last_bn=True,
        )
        self.predictor = ProjectionHead(
            projection_dim, projection_hidden_dim, projection_dim, num_layers=2, last_bn=vit
        )
        self.momentum_backbone = momentum_teacher(self.backbone)
        self.momentum_projector = momentum_teacher(self.projector)

    @torch.no_grad()
    def _keys(self, images: Tensor) -> Tensor:
        """Momentum-encoder keys of this rank's images, encoded with shuffled BN."""
        shuffled, permutation = shuffle_across_ranks(images)
        keys = self.momentum_projector(self.momentum_backbone(shuffled))
        return unshuffle_across_ranks(keys, permutation)

    def _contrastive(self, q: Tensor, k: Tensor) -> Tensor:
        return info_nce_loss(q, k, None, self.temperature) * (2 * self.temperature)

    @classmethod
    def validate(cls, options: Mapping[str, Any]) -> None:
        """A positive temperature, a base momentum in [0, 1], head widths of at least 1."""
        check_options(
            options,
            temperature=POSITIVE,
            base_momentum=PROBABILITY,
            projection_hidden_dim=AT_LEAST_ONE,
            projection_dim=AT_LEAST_ONE,
        )

    @classmethod
    def requirements(cls, options: Mapping[str, Any]) -> MethodRequirements:
        """Two global views of whole images, asymmetric: BYOL's recipe (and global BN), as in the
        official code's augmentation1 / augmentation2."""
        return MethodRequirements(views=BYOL_VIEWS, global_bn=True)

    def loss(self, batch: Batch) -> MethodOutput:
        """Algorithm 1's symmetrised contrastive loss: each view's query against the momentum
        encoder's keys of the other view, the global batch's other keys as negatives."""
        views = batch.views
        x_1, x_2 = views
        q_1 = self.predictor(self.projector(self.backbone(x_1)))
        q_2 = self.predictor(self.projector(self.backbone(x_2)))
        k_1, k_2 = self._keys(x_1), self._keys(x_2)
        loss = self._contrastive(q_1, k_2) + self._contrastive(q_2, k_1)

        with torch.no_grad():
            pos_sim = F.cosine_similarity(torch.cat([q_1, q_2]), torch.cat([k_2, k_1])).mean()
        logs = {
            "loss": loss.detach(),
            "pos_sim": pos_sim,
            "momentum": torch.tensor(self.momentum),
        }
        return MethodOutput(loss=loss, logs=logs)

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """EMA of the online backbone and projector, with the cosine-scheduled momentum."""
        self.momentum = cosine_momentum(step, total_steps, self.base_momentum)
        ema_update_(self.momentum_backbone, self.backbone, self.momentum)
        ema_update_(self.momentum_projector, self.projector, self.momentum)
