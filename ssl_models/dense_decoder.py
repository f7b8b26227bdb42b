"""A decoder from a backbone's feature map to per-pixel outputs, for the dense pretext tasks.

Context encoders (Pathak et al. 2016) decode the masked region's pixels, denoising
autoencoders (Vincent et al. 2008) the clean image, and colorization (Zhang et al. 2016) a
distribution over colour bins per pixel. Each pairs the backbone with up-convolutions; this
is that decoder in a backbone-agnostic form: it starts from ``backbone.feature_map(x)``
(any stride, CNN or ViT), doubles the resolution ``upsamplings`` times with
upsample-conv-BN-ReLU blocks (nearest upsampling then a 3x3 convolution: no checkerboard
artefacts, Odena et al. 2016) and resizes to the requested output size at the end.
"""

import torch.nn.functional as F
from torch import Tensor, nn


class DenseDecoder(nn.Module):
    """(N, in_channels, h, w) feature map -> (N, out_channels, height, width).

    Args:
        in_channels: the backbone's feature-map channels (its ``out_dim``).
        out_channels: outputs per pixel (3 for RGB pixels, the number of colour bins...).
        hidden: channels of the up-convolution blocks.
        upsamplings: resolution doublings before the final resize; 3 takes a 4x4 map of a
            28-32 px image to 32x32.
    """

    def __init__(
        self, in_channels: int, out_channels: int, hidden: int = 64, upsamplings: int = 3
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = [
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
        ]
        for _ in range(upsamplings):
            blocks += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(hidden, hidden, 3, padding=1, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU(inplace=True),
            ]
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Conv2d(hidden, out_channels, 3, padding=1)

    def forward(self, feature_map: Tensor, size: tuple[int, int]) -> Tensor:
        """Feature map (N, C, h, w) -> (N, out_channels, *size), bilinearly resized to
        ``size`` when the upsamplings do not land on it."""
        x = self.out(self.blocks(feature_map))
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x
