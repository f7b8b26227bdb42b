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
from typing import Any

from torch import nn

from ssl_models.heads import ProjectionHead
from ssl_models.losses.classification import classification_loss
from ssl_models.method import Batch, MethodOutput, MethodRequirements, SSLMethod
from ssl_models.options import NON_NEGATIVE, check_options
from ssl_models.registry import register
from ssl_models.transforms.rotations import NUM_ROTATIONS, RotatedCopies


@register("rotation")
class RotNet(SSLMethod):
    """RotNet: a 4-way classifier on the backbone features recognises each copy's rotation.

    Args:
        backbone: encoder mapping images to (N, feature_dim) pooled features.
        feature_dim: backbone output dimension.
        classifier_hidden_dim: 0 (default) for a linear classifier on the pooled features, as
            the paper's CIFAR-10 NIN and VISSL; otherwise the width of one hidden
            Linear-BN-ReLU layer in front of it.
    """

    def __init__(
        self, backbone: nn.Module, feature_dim: int, *, classifier_hidden_dim: int = 0
    ) -> None:
        super().__init__(backbone, feature_dim)
        self.classifier: nn.Module = (
            nn.Linear(feature_dim, NUM_ROTATIONS)
            if classifier_hidden_dim == 0
            else ProjectionHead(feature_dim, classifier_hidden_dim, NUM_ROTATIONS)
        )

    @classmethod
    def validate(cls, options: Mapping[str, Any]) -> None:
        """A classifier hidden width >= 0 (0: a linear classifier)."""
        check_options(options, classifier_hidden_dim=NON_NEGATIVE)

    @classmethod
    def requirements(cls, options: Mapping[str, Any]) -> MethodRequirements:
        """One view, which the data stage ships in all four rotations with their labels."""
        return MethodRequirements(global_views=1, pretext=RotatedCopies())

    def loss(self, batch: Batch) -> MethodOutput:
        """Cross-entropy over the four rotations, the mean over every image's copies
        (eq. 2)."""
        copies, labels = batch.views[0], batch.target("rotation")
        if copies.ndim != 5 or labels.shape != copies.shape[:2]:
            raise ValueError(
                f"RotNet takes the data stage's rotated copies (N, 4, C, H, W) and their labels "
                f"(N, 4), got {tuple(copies.shape)} and {tuple(labels.shape)}"
            )
        # Rotation-major order: all four copies go through one backbone pass (shared batch-norm
        # statistics, as the official loader's flattened batch), and its first N rows are the
        # unrotated images in batch order, which the online probe reads with the image labels.
        x = copies.transpose(0, 1).flatten(0, 1)
        y = labels.transpose(0, 1).flatten()
        # Eq. 2: the mean over the images and their K copies.
        loss, accuracy = classification_loss(self.classifier(self.backbone(x)), y)
        return MethodOutput(loss=loss, logs={"loss": loss.detach(), "pretext_accuracy": accuracy})
