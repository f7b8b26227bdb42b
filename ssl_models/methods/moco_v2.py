"""MoCo v2 (He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation
Learning", arXiv:1911.05722; Chen et al. 2020, "Improved Baselines with Momentum Contrastive
Learning", arXiv:2003.04297), in its symmetrised form.

    f_k.params = f_q.params                      # key encoder starts as an exact copy
    for x in loader:
        x_1, x_2 = two random augmentations of x
        q_1, q_2 = f_q(x_1), f_q(x_2)            # backbone + MLP head, with gradient
        k_1, k_2 = f_k(x_1), f_k(x_2)            # no gradient; shuffled BN
        loss = (InfoNCE(q_1, k_2, queue) + InfoNCE(q_2, k_1, queue)) / 2
        loss.backward(); update(f_q)
        f_k.params = m * f_k.params + (1 - m) * f_q.params
        enqueue(queue, all_gather(k_2)); dequeue the oldest
"""

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models.batch_norm import use_split_batch_norm
from ssl_models.dist import gather_no_grad, shuffle_across_ranks, unshuffle_across_ranks
from ssl_models.losses.info_nce import info_nce_loss
from ssl_models.method import Batch, MethodOutput, SSLMethod
from ssl_models.momentum import ema_update_, momentum_teacher
from ssl_models.options import AT_LEAST_ONE, POSITIVE, PROBABILITY, check_options
from ssl_models.queue import FeatureQueue
from ssl_models.registry import register


@register("moco_v2")
class MoCoV2(SSLMethod):
    """MoCo v2: momentum key encoder, a FIFO queue of negatives, InfoNCE.

    Design choices, in the paper's terms:

    - Head: MoCo v2's 2-layer MLP (Linear-ReLU-Linear, no batch norm), on the query and the
      key encoder alike; ``mlp_head=False`` gives MoCo v1's linear head (the preset
      ``configs/moco_v1.yaml``: linear head, T=0.07, no blur).
    - Momentum update: constant ``momentum``, applied in :meth:`after_optimizer_step`. The
      paper's pseudo-code updates the key encoder right after the query encoder's SGD step,
      and the official code at the start of the next forward; both are the same update, and
      either way the key encoder is updated before the next key forward pass.
    - Shuffled BN: keys are computed on a batch shuffled across ranks and then unshuffled, so
      a query and its positive key are normalised with statistics of different sub-batches
      and batch norm cannot leak which key is the positive. In a single process the shuffle
      alone is a mere permutation of one batch, which batch norm does not see; there, as in
      the official CIFAR demo, the backbone's batch norms are split BN
      (``ssl_models.batch_norm.SplitBatchNorm``, ``bn_splits`` interleaved sub-batches), so
      shuffled keys are normalised in other sub-batches than their queries. With several
      workers split BN is ordinary BN and the shuffle spans the ranks.
    - Symmetrised loss: both views serve as query and as key and the two InfoNCE terms are
      averaged (an option of the official MoCo CIFAR-10 demo, always on in solo-learn's
      MoCo v2+; the paper uses the single term q_1 vs k_2). Averaging keeps the scale of the
      one-term loss, so learning rates carry over.
    - Queue: after the loss, the keys ``k_2`` of the whole global batch (gathered from all
      ranks without gradient) replace the oldest entries, so every rank holds the same queue
      and it advances by one global batch per step, as in the paper (the symmetric CIFAR
      demo enqueues k_1 and k_2, twice the rate; solo-learn keeps one queue per view).
      The queue is a buffer
      updated inside ``forward``: it checkpoints with ``state_dict()``, and the pipeline
      builds DDP with ``broadcast_buffers=False`` so it is never overwritten from rank 0.

    Args:
        backbone: encoder mapping images to (N, feature_dim) features.
        feature_dim: backbone output dimension.
        temperature: InfoNCE temperature (0.2 in MoCo v2; 0.07 in MoCo v1).
        queue_size: number of queued negatives K; must be a multiple of the global batch.
            The paper uses 65536 on ImageNet; 4096 is the MoCo CIFAR-10 demo's value and
            suits datasets of tens of thousands of images (the queue should stay a small
            fraction of an epoch so its keys are not stale).
        momentum: key encoder momentum m. 0.999 in the paper (ImageNet, 5000 steps per
            epoch); 0.99, as in the CIFAR demo and solo-learn, suits short runs on small
            datasets where the key encoder must keep up with fewer steps.
        projection_hidden_dim: hidden width of the MLP head (2048 in the paper, matching
            ResNet-50 features; 512 suits the small CPU backbones used here).
        projection_dim: output dimension of the head (128 in the paper).
        bn_splits: sub-batches of the single-process split BN (8, the CIFAR demo's; 1 turns
            it off); a worker's batch must divide into them.
        mlp_head: MoCo v2's MLP head (True) or MoCo v1's single linear layer (False), which
            ignores ``projection_hidden_dim``.
    """

    finetune_head = "projector"

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        temperature: float = 0.2,
        queue_size: int = 4096,
        momentum: float = 0.99,
        projection_hidden_dim: int = 512,
        projection_dim: int = 128,
        bn_splits: int = 8,
        mlp_head: bool = True,
    ) -> None:
        super().__init__(backbone, feature_dim)
        use_split_batch_norm(self.backbone, bn_splits)  # before the key encoder's copy
        self.temperature = temperature
        self.momentum = momentum
        self.projector = (
            nn.Sequential(
                nn.Linear(feature_dim, projection_hidden_dim),
                nn.ReLU(inplace=True),
                nn.Linear(projection_hidden_dim, projection_dim),
            )
            if mlp_head
            else nn.Sequential(nn.Linear(feature_dim, projection_dim))
        )
        self.key_backbone = momentum_teacher(self.backbone)
        self.key_projector = momentum_teacher(self.projector)
        self.queue = FeatureQueue(queue_size, projection_dim)

    @torch.no_grad()
    def _keys(self, images: Tensor) -> Tensor:
        """L2-normalised keys of this rank's images, encoded with shuffled BN."""
        shuffled, permutation = shuffle_across_ranks(images)
        keys = self.key_projector(self.key_backbone(shuffled))
        return F.normalize(unshuffle_across_ranks(keys, permutation), dim=1)

    @classmethod
    def validate(cls, options: Mapping[str, Any]) -> None:
        """A positive temperature, a queue and head widths of at least 1, and a key
        encoder momentum in [0, 1]."""
        check_options(
            options,
            temperature=POSITIVE,
            queue_size=AT_LEAST_ONE,
            momentum=PROBABILITY,
            projection_hidden_dim=AT_LEAST_ONE,
            projection_dim=AT_LEAST_ONE,
            bn_splits=AT_LEAST_ONE,
        )

    def loss(self, batch: Batch) -> MethodOutput:
        """Symmetrised InfoNCE (eq. 1): each view's query against the other view's key,
        the queue's keys as negatives; then, in training, the second view's keys join the queue."""
        views = batch.views
        x_1, x_2 = views
        q_1 = self.projector(self.backbone(x_1))
        q_2 = self.projector(self.backbone(x_2))
        k_1, k_2 = self._keys(x_1), self._keys(x_2)

        # A copy: the push below writes the buffer in place, and autograd keeps the
        # negatives for the backward pass.
        negatives = self.queue.features.clone()
        loss = (
            info_nce_loss(q_1, k_2, negatives, self.temperature)
            + info_nce_loss(q_2, k_1, negatives, self.temperature)
        ) / 2
        if self.training:
            self.queue.push(gather_no_grad(k_2))

        with torch.no_grad():
            pos_sim = F.cosine_similarity(torch.cat([q_1, q_2]), torch.cat([k_2, k_1])).mean()
        return MethodOutput(loss=loss, logs={"loss": loss.detach(), "pos_sim": pos_sim})

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Move the key encoder towards the query encoder with the constant momentum."""
        ema_update_(self.key_backbone, self.backbone, self.momentum)
        ema_update_(self.key_projector, self.projector, self.momentum)
