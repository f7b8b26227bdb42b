"""Denoising autoencoder (Vincent, Larochelle, Bengio, Manzagol 2008, "Extracting and Composing
Robust Features with Denoising Autoencoders", ICML, doi:10.1145/1390156.1390294; corruption
types and the emphasised loss from Vincent et al. 2010, "Stacked Denoising Autoencoders", JMLR
11:3371-3408). Neither paper has an arXiv version.

    for x in loader:                         # the data stage: one view per image
        x~ = q_D(x~ | x)                     # corrupt; J = the corrupted components
        z = g(f(x~))                         # encode the corrupted view, decode pixels
        loss = alpha * sum_{j in J} (x_j - z_j)^2 + beta * sum_{j not in J} (x_j - z_j)^2

The corruption ``q_D`` acts on the components of the input vector, i.e. on each channel value
of each pixel independently, with ``nu`` the fraction of the d = C*H*W components of each
example that it destroys (the 2010 paper's three corruption types):

- masking: exactly round(nu * d) components chosen at random per example are forced to 0
  (2008: "a fixed number nu*d of components are chosen at random");
- salt_pepper: exactly round(nu * d) components chosen at random per example are set to the
  minimum or the maximum value (0 or 255) by a fair coin flip;
- gaussian: additive isotropic noise N(0, sigma^2 I) on every component, rounded and clipped
  back to 0..255 as the images stay uint8 until the loop normalises them. ``sigma`` is given
  in the paper's [0, 1] intensity units (its values 0.05-0.5), i.e. 255 * sigma pixel levels.
  Every component is corrupted, so the emphasised loss reduces to ``alpha`` times the plain one.

The paper's encoder and decoder are single sigmoid layers with tied weights on raw [0, 1]
pixels; here the encoder is the backbone and the decoder ``DenseDecoder`` on its feature map,
as for the other dense pretext tasks. The loop standardises the views per channel, so the
inputs are real-valued, not in [0, 1]: the paper then prescribes the squared error with an
affine decoder output (the 2010 paper: squared error for real-valued x), which is what
this uses; its cross-entropy is for binary or [0, 1]-bounded inputs with a sigmoid decoder.
"""

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ssl_models.backbones import feature_map, image_channels
from ssl_models.dense_decoder import DenseDecoder
from ssl_models.method import Batch, MethodOutput, MethodRequirements, SSLMethod
from ssl_models.options import AT_LEAST_ONE, FRACTION, NON_NEGATIVE, POSITIVE, check_options, one_of
from ssl_models.registry import register
from ssl_models.transforms.corrupt import CORRUPTIONS, Corrupt


def emphasised_squared_error(
    pred: Tensor, target: Tensor, corrupted: Tensor, alpha: float = 1.0, beta: float = 1.0
) -> Tensor:
    """The 2010 paper's L_{2,alpha}: weight ``alpha`` on the squared errors of the corrupted
    components, ``beta`` on the rest, summed over components, divided by their number d (so
    alpha = beta = 1 is the mean squared error), averaged over the batch."""
    weights = torch.where(corrupted, alpha, beta).to(pred.dtype)
    return (weights * (pred - target).square()).mean()


@register("denoising_ae")
class DenoisingAutoencoder(SSLMethod):
    """Encode the corrupted view with the backbone, decode the clean image, squared error.

    Args:
        backbone: any backbone with ``feature_map`` (small_cnn, ResNets, ViTs).
        feature_dim: its output channels.
        corruption: ``"masking"`` (the 2008 paper's), ``"gaussian"`` or ``"salt_pepper"``.
        noise_level: the fraction nu of components corrupted (masking, salt_pepper), or the
            Gaussian's sigma in [0, 1] intensity units. 0.25, the 2008 paper's usual
            validated choice (it tries 0-50%; the 2010 paper 0-40% and sigma 0.05-0.5).
        emphasis_alpha, emphasis_beta: the emphasised loss's weights on the corrupted and the
            other components (the 2010 paper's "double emphasis" 1 / 0.5, "full emphasis"
            1 / 0). 1 / 1, the plain squared error of the 2008 paper, by default.
        decoder_hidden, decoder_upsamplings: the ``DenseDecoder``'s width and doublings.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        corruption: str = "masking",
        noise_level: float = 0.25,
        emphasis_alpha: float = 1.0,
        emphasis_beta: float = 1.0,
        decoder_hidden: int = 64,
        decoder_upsamplings: int = 3,
    ) -> None:
        super().__init__(backbone, feature_dim)
        self.alpha, self.beta = emphasis_alpha, emphasis_beta
        channels = image_channels(backbone)
        self.decoder = DenseDecoder(feature_dim, channels, decoder_hidden, decoder_upsamplings)

    @classmethod
    def validate(cls, options: Mapping[str, Any]) -> None:
        """A known corruption, a noise level in (0, 1), emphasis weights alpha > 0 and
        beta >= 0, a decoder width of at least 1."""
        check_options(
            options,
            corruption=one_of(*CORRUPTIONS),
            noise_level=FRACTION,
            emphasis_alpha=POSITIVE,
            emphasis_beta=NON_NEGATIVE,
            decoder_hidden=AT_LEAST_ONE,
            decoder_upsamplings=NON_NEGATIVE,
        )

    @classmethod
    def requirements(cls, options: Mapping[str, Any]) -> MethodRequirements:
        """One view, which the data stage corrupts: ``forward`` gets the corrupted view,
        the clean one and which components the corruption chose (``corrupted``)."""
        corrupt = Corrupt(options["corruption"], options["noise_level"])
        # One view drawn; the transform ships it corrupted and clean.
        return MethodRequirements(global_views=1, forward_views=2, pretext=corrupt)

    def reconstruct(self, images: Tensor) -> Tensor:
        """g(f(x~)): the decoded image, (N, C, H, W) in the inputs' normalised units."""
        return self.decoder(feature_map(self.backbone, images), tuple(images.shape[-2:]))

    def loss(self, batch: Batch) -> MethodOutput:
        """The emphasised squared reconstruction error of Vincent et al. 2010 of the clean
        view: weight ``alpha`` on the corrupted components, ``beta`` on the others."""
        (noisy, clean), corrupted = batch.views, batch.target("corrupted").bool()
        if noisy.shape != clean.shape or corrupted.shape != clean.shape:
            raise ValueError(
                f"corrupted view {tuple(noisy.shape)}, clean view {tuple(clean.shape)} and "
                f"mask {tuple(corrupted.shape)} must have the same shape"
            )
        # In float32: under bfloat16 autocast the decoder's output is rounded to 8 bits.
        pred = self.reconstruct(noisy).float()
        loss = emphasised_squared_error(pred, clean.float(), corrupted, self.alpha, self.beta)
        errors = (pred.detach() - clean.float()).square()
        count = corrupted.sum()
        logs = {
            "loss": loss.detach(),
            "mse": errors.mean(),  # comparable across emphasis weights
            # A masked sum, not errors[corrupted]: boolean indexing syncs with the GPU.
            "corrupted_mse": (errors * corrupted).sum() / count.clamp(min=1),
            "corrupted_fraction": count / corrupted.numel(),
        }
        return MethodOutput(loss=loss, logs=logs)
