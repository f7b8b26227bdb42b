"""RotNet (Gidaris, Singh and Komodakis 2018, "Unsupervised Representation Learning by
Predicting Image Rotations", arXiv:1803.07728): recognise which of four rotations an image
was given. Section 2 and the official code (gidariss/FeatureLearningRotNet):

    for x in loader:                                # one augmented view: crop and flip
        x_0, x_1, x_2, x_3 = rot90(x, y) for y in 0..3      # y * 90 degrees, counter-clockwise
        logits_y = W f(x_y)                         # 4-way classifier on the features
        loss = mean over the batch and y of CE(logits_y, y)           # eq. 1-2, K = 4

Every image is shown in all four rotations in the same batch (Section 3.1: "significant
improvement" over drawing one rotation per image), so a batch of N images trains on 4N
copies, the label of copy y being y. Multiples of 90 degrees are flips and transposes, with
no interpolation or border artefacts that would give the rotation away.

The data stage makes the copies: one view (N, 4, C, H, W), copy y rotated by y * 90 degrees
counter-clockwise (``torch.rot90`` over the last two dims, the direction of the official
``rotate_img``), and the labels ``target_rotation`` (N, 4) = [0, 1, 2, 3] per image. The paper
augments with random crops and flips only, so set the colour distortion off to match it
(``augment.strength=0``, ``augment.jitter_prob=0``, ``augment.grayscale_prob=0``).

The classifier sits on the pooled backbone features, as in the paper's CIFAR-10 RotNet
(NIN blocks, global average pooling, one linear layer: ``architectures/NetworkInNetwork.py``)
and VISSL's ResNet-50 RotNet (linear 2048 -> 4 head). A linear head makes the rotation
linearly readable from the very features the probes evaluate; ``classifier_hidden_dim`` adds
a hidden layer, like the fully connected layers of the paper's AlexNet RotNet. The paper
finds its best transfer features in middle blocks (conv2 of 4); here, as for every method,
evaluation uses the backbone's final pooled features.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models.heads import ProjectionHead
from ssl_models.method import MethodOutput, PretextViews, SSLMethod

#: Rotations by 0, 90, 180 and 270 degrees: the paper's four-way task (its Table 2 finds
#: these four better than 2 or 8 rotations).
NUM_ROTATIONS = 4


@dataclass(frozen=True)
class RotatedCopies:
    """Data-stage transform: each image in all four rotations, labelled by the rotation."""

    def __call__(self, views: list[Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        # The generator goes unused: which rotations an image gets is fixed, all four.
        if len(views) != 1:
            raise ValueError(f"RotNet rotates exactly 1 view per image, got {len(views)}")
        (images,) = views  # uint8 (N, C, H, W)
        if images.shape[-1] != images.shape[-2]:
            raise ValueError(f"RotNet needs square images to stack rotations, got {images.shape}")
        rotated = [torch.rot90(images, y, dims=(-2, -1)) for y in range(NUM_ROTATIONS)]
        copies = torch.stack(rotated, dim=1)
        labels = torch.arange(NUM_ROTATIONS, device=images.device).expand(len(images), -1)
        return {"view_0": copies, "target_rotation": labels.contiguous()}


class RotNet(SSLMethod):
    """RotNet: a 4-way classifier on the backbone features recognises each copy's rotation.

    Args:
        backbone: encoder mapping images to (N, feature_dim) pooled features.
        feature_dim: backbone output dimension.
        classifier_hidden_dim: 0 (default) for a linear classifier on the pooled features, as
            the paper's CIFAR-10 NIN and VISSL; otherwise the width of one hidden
            Linear-BN-ReLU layer in front of it.
    """

    num_views: ClassVar[int] = 1

    def __init__(
        self, backbone: nn.Module, feature_dim: int, *, classifier_hidden_dim: int = 0
    ) -> None:
        super().__init__(backbone, feature_dim)
        if classifier_hidden_dim < 0:
            raise ValueError(f"classifier_hidden_dim must be >= 0, got {classifier_hidden_dim}")
        self.classifier: nn.Module = (
            nn.Linear(feature_dim, NUM_ROTATIONS)
            if classifier_hidden_dim == 0
            else ProjectionHead(feature_dim, classifier_hidden_dim, NUM_ROTATIONS)
        )

    @classmethod
    def pretext_views(cls, options: Mapping[str, Any]) -> PretextViews:
        return RotatedCopies()

    def forward(
        self,
        views: list[Tensor],
        indices: Tensor | None = None,
        targets: dict[str, Tensor] | None = None,
    ) -> MethodOutput:
        if len(views) != 1 or views[0].ndim != 5 or views[0].shape[1] != NUM_ROTATIONS:
            raise ValueError(
                "RotNet takes 1 view of shape (N, 4, C, H, W), the data stage's rotated copies"
            )
        if targets is None or "rotation" not in targets:
            raise ValueError("RotNet needs the data stage's rotation labels, targets['rotation']")
        copies, labels = views[0], targets["rotation"]
        if labels.shape != copies.shape[:2]:
            raise ValueError(f"rotation labels {labels.shape} do not match copies {copies.shape}")
        # Rotation-major order: all four copies go through one backbone pass (shared batch-norm
        # statistics, as the official loader's flattened batch), and its first N rows are the
        # unrotated images in batch order, which the online probe reads with the image labels.
        x = copies.transpose(0, 1).flatten(0, 1)
        y = labels.transpose(0, 1).flatten().long()
        logits = self.classifier(self.backbone(x))
        loss = F.cross_entropy(logits, y)  # eq. 2: mean over the images and their K copies
        accuracy = (logits.detach().argmax(1) == y).float().mean()
        return MethodOutput(loss=loss, logs={"loss": loss.detach(), "pretext_accuracy": accuracy})
