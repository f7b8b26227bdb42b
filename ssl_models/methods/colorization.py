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
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models.backbones import feature_map
from ssl_models.dense_decoder import DenseDecoder
from ssl_models.dist import all_reduce_sum
from ssl_models.lab_color import (
    ab_bins,
    rebalancing_weights,
    smoothed_distribution,
    soft_encode,
)
from ssl_models.method import Batch, MethodOutput, MethodRequirements, SSLMethod
from ssl_models.options import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, UP_TO_ONE, Rule, check_options
from ssl_models.registry import register
from ssl_models.transforms.lightness import ColorizationViews

#: An image whose subsampled ab values all lie within +-5 counts as gray (official net's
#: ``NonGrayMaskLayer``): its colours carry no signal, and it would inflate the gray bin.
GRAY_THRESHOLD = 5.0


@register("colorization")
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

    bins: Tensor  # buffer (Q, 2): the in-gamut ab bin centres
    bin_counts: Tensor  # buffer (Q,): nearest-bin counts, the empirical p

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
        self.neighbours, self.sigma, self.smoothing_sigma = neighbours, sigma, smoothing_sigma
        self.rebalance_mix = rebalance_mix
        self.decoder = DenseDecoder(feature_dim, len(bins), decoder_hidden, decoder_upsamplings)
        self.register_buffer("bins", bins, persistent=False)  # derived, not learned
        # How often each bin was a training pixel's nearest bin: the empirical p.
        self.register_buffer("bin_counts", torch.zeros(len(bins), dtype=torch.long))

    @classmethod
    def validate(cls, options: Mapping[str, Any]) -> None:
        """Ranges: ``neighbours`` in [1, Q] (Q = 261 in-gamut bins), positive widths, a
        rebalancing mix in (0, 1], a stride and decoder width of at least 1."""
        bins = len(ab_bins())
        check_options(
            options,
            neighbours=Rule(lambda x: 1 <= x <= bins, f"in [1, {bins}]"),
            sigma=POSITIVE,
            smoothing_sigma=POSITIVE,
            rebalance_mix=UP_TO_ONE,
            target_stride=AT_LEAST_ONE,
            decoder_hidden=AT_LEAST_ONE,
            decoder_upsamplings=NON_NEGATIVE,
        )

    @classmethod
    def requirements(cls, options: Mapping[str, Any]) -> MethodRequirements:
        """One RGB view, which the data stage turns into its lightness (the input) and its
        ab values at ``target_stride`` (the target); needs 3-channel images."""
        lightness = ColorizationViews(stride=int(options["target_stride"]))
        return MethodRequirements(global_views=1, input_channels=3, pretext=lightness)

    @torch.no_grad()
    def count_bins(self, nearest: Tensor) -> None:
        """Add the batch's nearest bins to the counts, summed over all DDP workers so every
        worker holds the same p (and DDP's buffer broadcast changes nothing)."""
        self.bin_counts += all_reduce_sum(torch.bincount(nearest, minlength=len(self.bins)))

    def loss(self, batch: Batch) -> MethodOutput:
        """The class-rebalanced multinomial cross-entropy of eq. 2 (mean over pixels): the
        predicted ab-bin distribution against the soft-encoded true colour, each pixel weighted
        by the rarity of its nearest bin (eq. 3-4); gray images get weight 0."""
        ab = batch.target("ab").float()  # (N, 2, h, w)
        n, _, height, width = ab.shape
        lightness = batch.views[0]
        logits = self.decoder(feature_map(self.backbone, lightness), (height, width)).float()

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
