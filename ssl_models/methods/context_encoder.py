"""Context encoders (Pathak, Krähenbühl, Donahue, Darrell & Efros 2016, "Context Encoders:
Feature Learning by Inpainting", arXiv:1604.07379), as trained for feature learning (Sec. 5.2):

    for x in loader:                            # one augmented view
        M = region mask: 1 in the hole          # central block, random blocks or region (3.3)
        z = encoder((1 - M) * x + M * mean)     # the hole is filled with the dataset mean
        z = channel_wise_fc(z)                  # every map unit sees the whole map (3.1)
        x_hat = decoder(z)                      # up-convolutions back to image size
        B = the context within `overlap` px of the hole  # predicted too (Sec. 4)
        W = M + 10 * B                          # 10x weight on that overlapping border
        loss = sum(W * (x_hat - x)^2) / sum(W)  # masked L2, Eq. 1 with the overlap

The data stage draws the hole (``target_mask``); ``forward`` zeroes it in the normalised
view, i.e. fills it with the mean. Region masks (Sec. 3.3), each hiding a quarter of the
image: ``central_block`` (half the side), ``random_blocks`` (smaller, possibly overlapping
squares, "up to 1/4") and ``random_region`` (the default: the paper's feature-learning
choice; it deforms PASCAL VOC segmentation masks, the authors' released code,
``train_random.lua``, thresholds smooth random noise instead, as done here).

Only the reconstruction loss: the paper's joint loss adds an adversarial term for sharp
inpainting, but its feature-learning results use L2 alone (the adversarial loss did not
converge with its AlexNet encoder, Sec. 5.2). The paper predicts a patch overlapping the
context by 7 px of 128, with 10x weight there; the released code keeps the predicted block
at half the side and shrinks the hole instead. Here the hole is the region mask and the
border is the hole grown by ``overlap`` (2 px at 28-32 px). The weighted error is averaged
with the weights; the released ``MSECriterion`` divides by the region's pixel count, which
scales the gradients by (|M| + 10 |B|) / |M + B|, several times at these sizes, and
diverged at learning rates that suit the other methods.
"""

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models.backbones import feature_map, image_channels
from ssl_models.dense_decoder import DenseDecoder
from ssl_models.method import Batch, MethodOutput, MethodRequirements, SSLMethod
from ssl_models.options import (
    AT_LEAST_ONE,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    Rule,
    check_options,
    one_of,
)
from ssl_models.registry import register
from ssl_models.transforms.holes import MASK_SHAPES, HoleMasks


def overlap_border(hole: Tensor, width: int) -> Tensor:
    """The context pixels within ``width`` px (Chebyshev distance) of the hole (N, H, W)."""
    if width == 0:
        return torch.zeros_like(hole)
    grown = F.max_pool2d(hole[:, None].float(), 2 * width + 1, stride=1, padding=width)
    return grown[:, 0].bool() & ~hole


def context_encoder_loss(
    pred: Tensor, images: Tensor, hole: Tensor, border: Tensor, overlap_weight: float
) -> Tensor:
    """Weighted mean squared error over the predicted region, per pixel and channel: weight 1
    in the hole, ``overlap_weight`` on the border, 0 (no gradient) on the rest of the
    context. Dividing by the weights' sum keeps it on the scale of a plain MSE whatever the
    border's share (the released code's MSECriterion divides by the region's size: the same
    gradients up to a factor, i.e. a learning-rate scale)."""
    weights = hole.float() + overlap_weight * border.float()  # (N, H, W)
    total = weights.sum() * images.shape[1]
    return (weights[:, None] * (pred.float() - images.float()).square()).sum() / total


class ChannelWiseFC(nn.Module):
    """The paper's channel-wise fully-connected layer (Sec. 3.1): each of the m channels of
    a ``grid`` x ``grid`` map gets its own fully-connected map to a ``grid`` x ``grid`` map
    (m * grid^4 weights, no bias), so every decoder unit sees the whole image without an
    m^2 * grid^4 fully-connected layer. A map of another size is average-pooled to ``grid``
    first; the decoder's 1x1 convolution then mixes channels (the paper's stride-1 conv)."""

    def __init__(self, channels: int, grid: int) -> None:
        super().__init__()
        self.grid = grid
        cells = grid * grid
        self.weight = nn.Parameter(torch.empty(channels, cells, cells))
        nn.init.uniform_(self.weight, -(cells**-0.5), cells**-0.5)  # nn.Linear's scale

    def forward(self, x: Tensor) -> Tensor:
        """Feature map (N, C, h, w), pooled to ``grid`` x ``grid`` if needed -> the same
        shape, every channel's cells fully connected among themselves."""
        if tuple(x.shape[-2:]) != (self.grid, self.grid):
            x = F.adaptive_avg_pool2d(x, self.grid)
        y = torch.einsum("nci,cij->ncj", x.flatten(2), self.weight)
        return y.view(len(x), -1, self.grid, self.grid)


@register("context_encoder")
class ContextEncoder(SSLMethod):
    """Context encoder: the backbone encodes the image with a hole, a channel-wise
    fully-connected layer and an up-convolutional decoder regress the hole's pixels.

    Args:
        backbone: any backbone with ``feature_map`` (CNN or ViT).
        feature_dim: its feature-map channels.
        mask_shape: ``"random_region"`` (the paper's feature-learning choice),
            ``"random_blocks"`` or ``"central_block"`` (Sec. 3.3).
        coverage: the fraction of the image the random shapes hide (the paper's "up to 1/4";
            the central block is always half the side, a quarter of the image).
        overlap: how far the predicted region reaches into the context around the hole, as a
            fraction of the image side (the paper's 7 px of 128; 2 px at 28-32 px).
        overlap_weight: the loss weight of that border (the paper's 10).
        channel_fc_grid: the side of the map the channel-wise layer connects (4: small_cnn's
            map of a 28-32 px image; the paper's AlexNet pool5 is 6).
        decoder_hidden, decoder_upsamplings: the :class:`DenseDecoder`'s width and its
            resolution doublings from ``channel_fc_grid`` (3: 4 -> 32 px, resized to the image).
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        mask_shape: str = "random_region",
        coverage: float = 0.25,
        overlap: float = 7 / 128,
        overlap_weight: float = 10.0,
        channel_fc_grid: int = 4,
        decoder_hidden: int = 64,
        decoder_upsamplings: int = 3,
    ) -> None:
        super().__init__(backbone, feature_dim)
        self.overlap, self.overlap_weight = overlap, overlap_weight
        self.channel_fc = ChannelWiseFC(feature_dim, channel_fc_grid)
        self.decoder = DenseDecoder(
            feature_dim, image_channels(backbone), decoder_hidden, decoder_upsamplings
        )

    @classmethod
    def validate(cls, options: Mapping[str, Any]) -> None:
        """A known ``mask_shape``, a coverage in (0, 1), an overlap in [0, 0.5), a positive
        overlap weight, a grid and decoder width of at least 1."""
        check_options(
            options,
            mask_shape=one_of(*MASK_SHAPES),
            coverage=FRACTION,
            overlap=Rule(lambda x: 0 <= x < 0.5, "in [0, 0.5)"),
            overlap_weight=POSITIVE,
            channel_fc_grid=AT_LEAST_ONE,
            decoder_hidden=AT_LEAST_ONE,
            decoder_upsamplings=NON_NEGATIVE,
        )

    @classmethod
    def requirements(cls, options: Mapping[str, Any]) -> MethodRequirements:
        """One view of whole images; the data stage draws each image's hole (``mask``)."""
        holes = HoleMasks(options["mask_shape"], options["coverage"])
        return MethodRequirements(global_views=1, pretext=holes)

    def loss(self, batch: Batch) -> MethodOutput:
        """The masked L2 reconstruction loss (eq. 1) on the hole's pixels, the border that
        overlaps the context weighted ``overlap_weight`` times."""
        (images,), hole = batch.views, batch.target("mask").bool()
        if hole.shape != (images.shape[0], *images.shape[-2:]):
            raise ValueError(f"mask {tuple(hole.shape)} does not match views {tuple(images.shape)}")
        context = images.masked_fill(hole[:, None], 0.0)  # 0 = the mean after normalisation
        code = self.channel_fc(feature_map(self.backbone, context))
        pred = self.decoder(code, tuple(images.shape[-2:]))
        border = overlap_border(hole, round(self.overlap * min(images.shape[-2:])))
        loss = context_encoder_loss(pred, images, hole, border, self.overlap_weight)
        with torch.no_grad():
            hole_mse = context_encoder_loss(pred, images, hole, torch.zeros_like(hole), 1.0)
        logs = {
            "loss": loss.detach(),
            "hole_mse": hole_mse,
            "hole_fraction": hole.float().mean(),
        }
        return MethodOutput(loss=loss, logs=logs)
