"""Instance discrimination with a memory bank (Wu et al. 2018, "Unsupervised Feature
Learning via Non-Parametric Instance Discrimination", arXiv:1805.01978).

Every training image is its own class. A memory bank keeps one 128-d feature per image;
the image's feature must pick out its own bank entry among m entries drawn uniformly at
random, after which the bank entry moves towards the new feature:

    for x, i in loader:                        # i: the images' dataset indices
        v = normalise(g(f(augment(x))))        # one view per image
        s_j = V[j] . v / t  for j in {i} + m noise entries
        loss = softmax:  -log( exp(s_i) / sum_j exp(s_j) )          # eq. 2, sampled
               nce:      -log h(i, v) - sum_noise log(1 - h(j, v))   # eq. 5-7, Z fixed
        V[i] = normalise(mu * V[i] + (1 - mu) * v)                   # proximal, mu = 0.5

The paper trains with NCE on 1.28M images. NCE estimates the partition function Z once, on
the random initial bank; on small datasets the early, still-similar features then make
every noise entry look like data and the loss explodes, so the default objective is the
sampled non-parametric softmax of eq. 2 (the form later reimplementations compare against).

One set of m noise entries is drawn per step and shared by the batch (the paper's code draws
m per image): the estimator is unchanged in expectation, and a (B, d) x (d, m) product
replaces gathering B * m bank rows, which made InstDisc 3x slower than two-view SimCLR.
"""

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models.dist import gather_no_grad
from ssl_models.losses.nce import nce_loss
from ssl_models.method import Batch, MethodOutput, MethodRequirements, SSLMethod
from ssl_models.options import AT_LEAST_ONE, BELOW_ONE, POSITIVE, check_options, one_of
from ssl_models.queue import MemoryBank
from ssl_models.registry import register


@register("instdisc")
class InstDisc(SSLMethod):
    """Non-parametric instance discrimination with NCE over a memory bank.

    Args:
        backbone: encoder mapping images to (N, feature_dim) features.
        feature_dim: backbone output dimension.
        num_images: training-set size, one bank slot per image (supplied by the pipeline).
        embedding_dim: dimension of the bank's features (128 in the paper).
        temperature: softmax temperature t (0.07 in the paper).
        num_negatives: noise samples m per image (4096 in the paper).
        bank_momentum: proximal update momentum mu (0.5 in the paper).
        objective: "softmax" (sampled eq. 2) or "nce" (eq. 5-7).
    """

    normalizer: Tensor  # buffer (): the NCE normaliser Z

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        num_images: int,
        *,
        embedding_dim: int = 128,
        temperature: float = 0.07,
        num_negatives: int = 4096,
        bank_momentum: float = 0.5,
        objective: str = "softmax",
    ) -> None:
        super().__init__(backbone, feature_dim)
        self.objective = objective
        self.embedding = nn.Linear(feature_dim, embedding_dim)
        self.bank = MemoryBank(num_images, embedding_dim)
        self.temperature, self.num_negatives, self.bank_momentum = (
            temperature,
            num_negatives,
            bank_momentum,
        )
        # The NCE normaliser Z; negative until estimated on the first batch (NCE only).
        self.register_buffer("normalizer", torch.tensor(-1.0))

    @classmethod
    def validate(cls, options: Mapping[str, Any]) -> None:
        """Embedding size and negatives of at least 1, a positive temperature, a bank
        momentum in [0, 1) and a known objective."""
        check_options(
            options,
            embedding_dim=AT_LEAST_ONE,
            temperature=POSITIVE,
            num_negatives=AT_LEAST_ONE,
            bank_momentum=BELOW_ONE,
            objective=one_of("softmax", "nce"),
        )

    @classmethod
    def requirements(cls, options: Mapping[str, Any]) -> MethodRequirements:
        """One view and the images' dataset indices (their memory-bank entries)."""
        return MethodRequirements(global_views=1, image_indices=True)

    def loss(self, batch: Batch) -> MethodOutput:
        """Non-parametric instance discrimination: the image's own bank entry among
        ``num_negatives`` random ones, by sampled softmax (eq. 2) or NCE (eq. 5-7); then the
        bank entries of the global batch move towards the new features."""
        views, indices = batch.views, batch.dataset_indices()
        v = F.normalize(self.embedding(self.backbone(views[0])), dim=1)
        n, num_images = v.shape[0], self.bank.features.shape[0]
        noise = torch.randint(0, num_images, (self.num_negatives,), device=v.device)
        with torch.no_grad():
            positives, negatives = self.bank.features[indices], self.bank.features[noise]
        logits = torch.cat([(positives * v).sum(1, keepdim=True), v @ negatives.T], dim=1)
        logits = logits / self.temperature  # column 0: the image's own entry
        if self.objective == "softmax":
            loss = F.cross_entropy(logits, torch.zeros(n, dtype=torch.long, device=v.device))
        else:
            scores = logits.exp()
            if self.normalizer < 0:  # Monte Carlo estimate, shared by all workers
                batch_mean = gather_no_grad(scores.detach().mean().view(1)).mean()
                self.normalizer.fill_(float(batch_mean) * num_images)
            loss = nce_loss(scores, self.normalizer, num_images)

        # Every worker applies every worker's update, so the banks stay identical.
        self.bank.update(gather_no_grad(indices), gather_no_grad(v.detach()), self.bank_momentum)
        positive_similarity = (positives * v.detach()).sum(1).mean()
        return MethodOutput(
            loss=loss, logs={"loss": loss.detach(), "positive_similarity": positive_similarity}
        )
