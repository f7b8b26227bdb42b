"""SwAV (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments", arXiv:2006.09882), Algorithm 1 with multi-crop, as in the official main_swav.py.

    # C: prototypes (D x K); model: backbone + projection head; temp: temperature
    for x in loader:
        with no_grad: C = normalize(C, dim=0)          # at the start of every iteration
        crops = 2 global + V local augmentations of x  # one backbone pass per resolution
        z = normalize(model(cat(crops)), dim=1)        # embeddings: (2 + V)B x D
        scores = mm(z, C)                              # prototype scores: (2 + V)B x K
        with no_grad:                                  # codes of the 2 global crops only
            q_t = sinkhorn(cat(queue_t @ C, scores_t))[-B:]   # queue: once it is enabled
            q_s = sinkhorn(cat(queue_s @ C, scores_s))[-B:]
            enqueue(queue_t, z_t); enqueue(queue_s, z_s)
        loss = swapped prediction: q_t from every other crop, q_s from every other crop
        loss.backward()
        if iteration < freeze_prototypes_iters: C.grad = None
        update(model.params, C)
"""

from collections.abc import Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models.dist import gather_no_grad, rank, world_size
from ssl_models.heads import ProjectionHead
from ssl_models.losses.swav import sinkhorn_knopp, swapped_prediction_loss
from ssl_models.method import Batch, MethodOutput, MethodRequirements, SSLMethod, encode_views
from ssl_models.options import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, check_options
from ssl_models.queue import FeatureQueue
from ssl_models.registry import register


@register("swav")
class SwAV(SSLMethod):
    """SwAV: online clustering with Sinkhorn-Knopp codes and swapped prediction, multi-crop.

    - Head: Linear-BN-ReLU-Linear to ``projection_dim``, L2-normalised; the projector's BN
      sees all crops at once (the official ``forward_head`` runs on the concatenation).
    - Prototypes: a bias-free linear layer whose rows are L2-normalised under no_grad at the
      start of every forward, as the official loop does at the start of each iteration.
    - Queue: per assignment crop, a FIFO buffer of past embeddings of the *global* batch
      (gathered from all ranks, so every rank holds the same buffer and rank 0's checkpoint
      restores all of them). Sinkhorn on rank r uses rank r's own past rows, which is the
      official per-rank queue of length queue_length / world_size; together the ranks'
      rows make the global queue, so codes equal the single-process ones. Filling starts
      at epoch ``epoch_queue_starts`` (epoch = optimiser steps done // steps_per_epoch,
      counted in a buffer) and the queue is used once full.

    Args:
        backbone: encoder mapping images to (N, feature_dim) features.
        feature_dim: backbone output dimension.
        num_prototypes: K. The paper uses 3000 on ImageNet (3x its 1000 classes), where the
            queue makes batch + queue exceed K. 100 keeps more than 2 samples per
            prototype in a batch of 256 without a queue, so the equipartition is meaningful
            at batch level, and still over-clusters 10-class datasets tenfold.
        temperature: softmax temperature of the predictions (0.1 in the paper).
        epsilon: Sinkhorn entropic regularisation (0.05 in the paper).
        sinkhorn_iterations: Sinkhorn-Knopp iterations (3 in the paper).
        queue_length: total queued embeddings per assignment crop over all ranks; a
            multiple of the global batch; 0 (off) as the official default. The paper uses
            3840 with batches of 256 and 3000 prototypes.
        epoch_queue_starts: epoch from which the queue is filled (15, the official value).
        freeze_prototypes_iters: the first optimiser steps during which the prototypes get
            no update. The official 313 is one ImageNet epoch at batch 4096; 200 is about
            one epoch of a 50-60k-image dataset (CIFAR, Fashion-MNIST) at batch 256.
        projection_hidden_dim: hidden width of the head (2048 in the paper, matching
            ResNet-50; 512 suits the small backbones used here, as for the other methods).
        projection_dim: embedding and prototype dimension (128 in the paper).
    """

    #: Crops given codes: the two global views (the official ``crops_for_assign`` = [0, 1]).
    crops_for_assign: tuple[int, ...] = (0, 1)

    queue_filled: Tensor  # buffer (): rows pushed so far
    steps_done: Tensor  # buffer (): optimiser steps taken

    finetune_head = "projector"

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        num_prototypes: int = 100,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        queue_length: int = 0,
        epoch_queue_starts: int = 15,
        freeze_prototypes_iters: int = 200,
        projection_hidden_dim: int = 512,
        projection_dim: int = 128,
    ) -> None:
        super().__init__(backbone, feature_dim)
        self.temperature, self.epsilon = temperature, epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.queue_length, self.epoch_queue_starts = queue_length, epoch_queue_starts
        self.freeze_prototypes_iters = freeze_prototypes_iters
        self.projector = ProjectionHead(feature_dim, projection_hidden_dim, projection_dim)
        self.prototypes = nn.Linear(projection_dim, num_prototypes, bias=False)
        self.queues = nn.ModuleList(
            FeatureQueue(queue_length, projection_dim)
            for _ in (self.crops_for_assign if queue_length else ())
        )
        # Rows pushed so far (the queue is used once full) and optimiser steps taken.
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def assignment_queue(self, i: int) -> FeatureQueue:
        """The queue of assignment crop ``crops_for_assign[i]`` (when ``queue_length`` > 0)."""
        return cast(FeatureQueue, self.queues[i])  # the ModuleList holds only these

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """L2-normalise each prototype (a row of the weight) in place."""
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def embed(self, views: list[Tensor]) -> Tensor:
        """Unit embeddings of all crops, in order: one backbone pass per run of same-size
        crops (the official multi-crop forward), then the head on the concatenation."""
        return F.normalize(encode_views(self.backbone, views, self.projector), dim=1)

    @torch.no_grad()
    def codes(self, embeddings: list[Tensor]) -> list[Tensor]:
        """Sinkhorn codes of the assignment crops, given every crop's (n, D) unit embeddings;
        over queue + batch once the queue is full (then only the batch's rows are kept)."""
        use_queue = self.queue_length > 0 and int(self.queue_filled) >= self.queue_length
        prototypes = self.prototypes.weight.float()
        result = []
        # float32 scores even under autocast: exp(scores / epsilon) would turn bf16's rounding
        # of a score (up to 0.004) into up to 8% in a code. Identical in float32 training.
        with torch.autocast(prototypes.device.type, enabled=False):
            for i, crop_id in enumerate(self.crops_for_assign):
                z = embeddings[crop_id].detach().float()
                n, dim = z.shape
                if use_queue:
                    # This rank's rows of each queued global batch (see the class docstring).
                    own = self.assignment_queue(i).features.view(-1, world_size(), n, dim)[
                        :, rank()
                    ]
                    z = torch.cat([own.reshape(-1, dim), z])
                q = sinkhorn_knopp(z @ prototypes.t(), self.epsilon, self.sinkhorn_iterations)
                result.append(q[-n:])
        return result

    @classmethod
    def validate(cls, options: Mapping[str, Any]) -> None:
        """Positive temperature and epsilon, counts and widths of at least 1, and
        non-negative queue length, queue start and prototype freeze."""
        check_options(
            options,
            num_prototypes=AT_LEAST_ONE,
            temperature=POSITIVE,
            epsilon=POSITIVE,
            sinkhorn_iterations=AT_LEAST_ONE,
            queue_length=NON_NEGATIVE,
            epoch_queue_starts=NON_NEGATIVE,
            freeze_prototypes_iters=NON_NEGATIVE,
            projection_hidden_dim=AT_LEAST_ONE,
            projection_dim=AT_LEAST_ONE,
        )

    @classmethod
    def requirements(cls, options: Mapping[str, Any]) -> MethodRequirements:
        """Two global views, then any local (multi-crop) views; any backbone."""
        return MethodRequirements(local_views=True)

    def loss(self, batch: Batch) -> MethodOutput:
        """The swapped prediction loss (eq. 1): every crop's prototype scores predict the
        Sinkhorn codes of each other global crop; the queue fills once its epoch comes."""
        views = batch.views
        self.normalize_prototypes()
        z = self.embed(views)
        scores = list(self.prototypes(z).chunk(len(views)))
        embeddings = list(z.detach().chunk(len(views)))
        codes = self.codes(embeddings)
        filling = self.queue_length > 0 and self.training
        if filling and self.steps_done >= self.steps_in(self.epoch_queue_starts):
            # After the codes: this step's embeddings serve the next steps' Sinkhorn.
            for i, crop_id in enumerate(self.crops_for_assign):
                self.assignment_queue(i).push(gather_no_grad(embeddings[crop_id]))
            pushed = int(self.queue_filled) + len(views[0]) * world_size()
            self.queue_filled.fill_(min(pushed, self.queue_length))
        loss = swapped_prediction_loss(scores, codes, self.crops_for_assign, self.temperature)
        with torch.no_grad():
            # Collapse indicator: distinct prototypes predicted (argmax) in this batch.
            assigned = torch.cat([scores[i] for i in self.crops_for_assign]).argmax(dim=1)
            used = assigned.unique().numel()
        logs = {"loss": loss.detach(), "prototypes_used": loss.new_tensor(float(used))}
        return MethodOutput(loss=loss, logs=logs)

    def before_optimizer_step(self, step: int) -> None:
        """Freeze the prototypes early on (official: their gradients set to None)."""
        if step < self.freeze_prototypes_iters:
            self.prototypes.weight.grad = None

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Record the steps taken, so a resumed run knows its epoch (the queue's start)."""
        self.steps_done.fill_(step + 1)
