"""Colorization (Zhang, Isola and Efros 2016, "Colorful Image Colorization",
arXiv:1603.08511), Section 2 and the official Caffe training net (richzhang/colorization,
``colorization_train_val_v2.prototxt``):

    for x in loader:                          # colour images; crops and flips only
        L, ab = Lab(x)                        # predict the chroma ab from the lightness L
        Y = ab[::4, ::4]                      # targets at 1/4 of the input resolution
        Z = soft_encode(Y)                    # 5 nearest of Q in-gamut bins, Gaussian sigma 5
        Z_hat = softmax(decoder(f(L)))        # (N, Q, H/4, W/4)
        counts += histogram(nearest bin of Y) # the bin distribution p, all-reduced over DDP
        w = ((1 - lambda) p~ + lambda / Q)^-1, normalised so sum_q p~_q w_q = 1   # eq. 4
        loss = -mean_{h,w} w[q*_hw] * sum_q Z_hwq log Z_hat_hwq   # eq. 2, q* = argmax_q Z

The data stage converts each image to Lab and ships the lightness as a gray 3-channel image
(round(L * 255 / 100) in every channel, so any backbone keeps its 3 input channels and the
loop's normalisation applies) and the ab values at 1/4 resolution. The paper estimates p
once, on ImageNet; here the counts of the training targets' nearest bins accumulate in a
buffer (summed over DDP workers each step, checkpointed with the model), so p is the
distribution of the run's own data so far. As in the official net, images with no ab value
beyond 5 in magnitude (grayscale photos) get weight 0. The paper's colour augmentations are
none: set ``augment.strength=0``, ``augment.jitter_prob=0`` and ``augment.grayscale_prob=0``.

The bins are the 10 x 10 ab cells that sRGB colours reach: Q = 261 (the official set has 313,
see ``ssl_models.lab_color``). Frozen-feature evaluation (``features``) runs the backbone on
the images it is given; the paper evaluates its network on the lightness channel.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models import dist as ssl_dist
from ssl_models.dense_decoder import DenseDecoder
from ssl_models.lab_color import (
    ab_bins,
    rebalancing_weights,
    smoothed_distribution,
    soft_encode,
    srgb_to_lab,
)
from ssl_models.method import MethodOutput, SSLMethod

#: An image whose subsampled ab values all lie within +-5 counts as gray (official net's
#: ``NonGrayMaskLayer``): its colours carry no signal, and it would inflate the gray bin.
GRAY_THRESHOLD = 5.0


@dataclass(frozen=True)
class ColorizationViews:
    """Data stage: one augmented RGB view -> ``view_0``, the lightness as a gray uint8 image
    (N, 3, H, W), and ``target_ab``, float ab values at stride ``stride`` (N, 2, h, w)."""

    stride: int = 4

    def __call__(self, views: list[Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        if len(views) != 1:
            raise ValueError(f"colorization takes exactly 1 view per image, got {len(views)}")
        (images,) = views
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                "colorization predicts colour from lightness and needs 3-channel RGB images, "
                f"got shape {tuple(images.shape)}; use a colour dataset (e.g. CIFAR-10)"
            )
        lab = srgb_to_lab(images.float() / 255)
        gray = (lab[:, :1] * (255 / 100)).round().clamp(0, 255).to(torch.uint8)
        # The official net subsamples with a stride-4 1x1 convolution of weight 1: the top-left
        # pixel of each 4 x 4 block, a real colour rather than a blend across edges.
        ab = lab[:, 1:, :: self.stride, :: self.stride]
        return {"view_0": gray.expand(-1, 3, -1, -1).contiguous(), "target_ab": ab.contiguous()}


class Colorization(SSLMethod):
    """Colorization as per-pixel classification over quantised ab bins, class-rebalanced.

    Args:
        backbone: any backbone with ``feature_map`` (the decoder reads its spatial map).
        feature_dim: its output channels.
        neighbours: bins each target colour is soft-encoded on (5 in the paper; the
            official training layer uses 10).
        sigma: Gaussian width of the soft encoding, ab units (5 in the paper).
        smoothing_sigma: Gaussian width smoothing the bin distribution p (5 in the paper).
        rebalance_mix: lambda of eq. 4, the uniform share mixed into p~ (0.5 in the paper;
            1 turns rebalancing off).
        target_stride: targets and predictions at 1/stride of the input resolution (4 in the
            paper: 8 x 8 for 32 px inputs).
        decoder_hidden: channels of the decoder's blocks (the paper's conv8 has 256).
        decoder_upsamplings: resolution doublings in the decoder before the final resize to
            the target size; 1 takes the 4 x 4 map of ``small_cnn`` or a small-image ResNet
            on 32 px inputs to 8 x 8; ImageNet-stem ResNets (stride 32) want 3.
    """

    num_views: ClassVar[int] = 1
    input_channels: ClassVar[int] = 3

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        neighbours: int = 5,
        sigma: float = 5.0,
        smoothing_sigma: float = 5.0,
        rebalance_mix: float = 0.5,
        target_stride: int = 4,
        decoder_hidden: int = 256,
        decoder_upsamplings: int = 1,
    ) -> None:
        super().__init__(backbone, feature_dim)
        bins = ab_bins()
        if not 1 <= neighbours <= len(bins):
            raise ValueError(f"neighbours must be in [1, {len(bins)}], got {neighbours}")
        if sigma <= 0 or smoothing_sigma <= 0:
            raise ValueError("sigma and smoothing_sigma must be > 0")
        if not 0.0 < rebalance_mix <= 1.0:
            raise ValueError(f"rebalance_mix must be in (0, 1], got {rebalance_mix}")
        if target_stride < 1 or decoder_upsamplings < 0 or decoder_hidden < 1:
            raise ValueError("target_stride and decoder_hidden must be >= 1, upsamplings >= 0")
        self.neighbours, self.sigma, self.smoothing_sigma = neighbours, sigma, smoothing_sigma
        self.rebalance_mix = rebalance_mix
        self.decoder = DenseDecoder(feature_dim, len(bins), decoder_hidden, decoder_upsamplings)
        self.register_buffer("bins", bins, persistent=False)  # derived, not learned
        # How often each bin was a training pixel's nearest bin: the empirical p.
        self.register_buffer("bin_counts", torch.zeros(len(bins), dtype=torch.long))

    @classmethod
    def pretext_views(cls, options: Mapping[str, Any]) -> ColorizationViews:
        return ColorizationViews(stride=int(options["target_stride"]))

    @torch.no_grad()
    def count_bins(self, nearest: Tensor) -> None:
        """Add the batch's nearest bins to the counts, summed over all DDP workers so every
        worker holds the same p (and DDP's buffer broadcast changes nothing)."""
        counts = torch.bincount(nearest, minlength=len(self.bins))
        if ssl_dist.world_size() > 1:
            dist.all_reduce(counts)
        self.bin_counts += counts

    def forward(
        self,
        views: list[Tensor],
        indices: Tensor | None = None,
        targets: dict[str, Tensor] | None = None,
    ) -> MethodOutput:
        if len(views) != 1 or targets is None or "ab" not in targets:
            raise ValueError("Colorization takes 1 view (the lightness) and targets['ab']")
        ab = targets["ab"].float()  # (N, 2, h, w)
        n, _, height, width = ab.shape
        logits = self.decoder(self.backbone.feature_map(views[0]), (height, width)).float()

        with torch.no_grad():
            points = ab.permute(0, 2, 3, 1).reshape(-1, 2)
            index, soft = soft_encode(points, self.bins, self.neighbours, self.sigma)
            nearest = index[:, 0]  # q* = argmax_q Z, the soft encoding's peak
            colourful = (ab.abs() > GRAY_THRESHOLD).flatten(1).any(dim=1)  # (N,)
            pixel_mask = colourful.repeat_interleave(height * width)
            if self.training:
                self.count_bins(nearest[pixel_mask])
            p_smooth = smoothed_distribution(self.bin_counts, self.bins, self.smoothing_sigma)
            w = rebalancing_weights(p_smooth, self.rebalance_mix).float()
            pixel_weight = w[nearest] * pixel_mask

        # Cross-entropy with the soft targets: only the k non-zero entries of Z contribute.
        log_probs = F.log_softmax(logits, dim=1)  # (N, Q, h, w)
        soft_map = soft.view(n, height, width, -1).permute(0, 3, 1, 2)  # (N, k, h, w)
        index_map = index.view(n, height, width, -1).permute(0, 3, 1, 2)
        cross_entropy = -(soft_map * log_probs.gather(1, index_map)).sum(dim=1)
        # The paper sums over pixels; the mean keeps the scale independent of the image size.
        loss = (pixel_weight.view(n, height, width) * cross_entropy).mean()
        accuracy = (logits.detach().argmax(dim=1).flatten() == nearest).float().mean()
        return MethodOutput(loss=loss, logs={"loss": loss.detach(), "pretext_accuracy": accuracy})
