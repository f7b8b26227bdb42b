"""Encoders that turn an image batch (N, C, H, W) into a feature batch (N, D).

The convolutional backbones end in global average pooling and the transformers return their
CLS token, so downstream code (projection heads, kNN and linear-probe evaluation) only ever
sees flat feature vectors. Dense pretext tasks (colorization, inpainting, denoising) decode
from ``feature_map(x)`` instead, the spatial (N, out_dim, h, w) map every backbone provides.

- ``resnet18`` / ``resnet50``: torchvision's residual blocks (He et al. 2016, arXiv:1512.03385)
  with every stage width multiplied by ``width``. Module names follow torchvision's ``ResNet``
  (``conv1``, ``bn1``, ``layer1`` ... ``layer4``), so at ``width=1`` and ``small_images=False``
  a torchvision state dict without ``fc`` loads as is. ``small_images=True`` swaps the
  ImageNet stem (7x7 stride-2 conv + max-pool) for a 3x3 stride-1 conv, the CIFAR variant
  used by SimCLR and solo-learn: on 32 px images the ImageNet stem would throw away 15/16 of
  the pixels before the first residual block.
- ``small_cnn``: four conv-BN-ReLU stages, a fast CPU-friendly encoder for demos on 28-32 px.
- ``vit_tiny`` / ``vit_small``: Vision Transformers (Dosovitskiy et al. 2021, arXiv:2010.11929)
  sized as DeiT-Ti / DeiT-S (Touvron et al. 2021, arXiv:2012.12877; 192 or 384 dims, 12
  blocks, 3 or 6 heads), built from torchvision's encoder blocks in ``ssl_models.vit``.
  ``width`` scales the embedding dim at a fixed head count. ``small_images=True`` uses 4 px
  patches (an 8x8 grid on 32 px, 7x7 on 28 px), otherwise 16 px patches (14x14 on 224 px);
  position embeddings are interpolated for other input sizes, which must be multiples of
  the patch size.
- ``torchvision:<name>`` / ``timm:<name>``: any classification model of those libraries,
  its pooled pre-logits as features (``ssl_models.library_backbones``).

Methods that need a kind of backbone ask by :func:`backbone_kind`: ``"vit"`` (patch tokens
to mask: the built-in ViTs and timm ``VisionTransformer``), ``"cnn"`` (no attention layer:
takes small tiles and gives a convolutional map) or ``"other"`` (Swin, torchvision's ViT...).
"""

import functools
from collections.abc import Callable, Sequence
from typing import Literal, Protocol, cast

import torch
from torch import Tensor, nn

# torchvision ships no type information (no py.typed marker).
from torchvision.models.resnet import (  # type: ignore[import-untyped]
    BasicBlock,
    Bottleneck,
)
from torchvision.models.resnet import ResNet as TorchvisionResNet

from ssl_models.library_backbones import (
    build_library_backbone,
    is_attention_model,
    is_library_model,
    library_feature_map,
    library_of,
    split_name,
    timm_vit_steps,
)
from ssl_models.vit import ViT, build_vit


class SpatialBackbone(Protocol):
    """What dense pretext tasks (colorization, inpainting, denoising) use of a backbone;
    every backbone here has it."""

    def feature_map(self, x: Tensor) -> Tensor:
        """The spatial (N, out_dim, h, w) map before pooling (or the patch tokens' grid)."""


def feature_map(backbone: nn.Module, x: Tensor) -> Tensor:
    """``backbone.feature_map(x)``, (N, out_dim, h, w): the map dense pretext tasks decode
    from, which every built-in backbone provides and library models give through
    ``library_backbones.library_feature_map``."""
    if library_of(backbone) is not None:
        return library_feature_map(backbone, x)
    return cast(SpatialBackbone, backbone).feature_map(x)


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


class ResNet(TorchvisionResNet):
    """torchvision's ``ResNet`` (an instance of it, with its module names) without the
    classifier, with scalable stage widths and the small-image stem."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: Sequence[int],
        *,
        width: float = 1.0,
        in_channels: int = 3,
        small_images: bool = True,
    ) -> None:
        # torchvision's __init__ fixes the widths at 64-512; its stage builder, forward and
        # module layout are reused, so at width 1 the parameters are torchvision's own.
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.dilation, self.groups, self.base_width = 1, 1, 64
        widths = [_scaled(c, width) for c in (64, 128, 256, 512)]
        if small_images:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)

        # base_width=64 keeps a Bottleneck's inner width equal to its (scaled) planes.
        self.inplanes = widths[0]
        self.layer1 = self._make_layer(block, widths[0], layers[0], stride=1)
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Identity()  # features, not logits
        self.dropped_head = "fc"  # a torchvision checkpoint's classifier keys, skipped
        self.out_dim = self.inplanes

        # Same initialisation as torchvision's ResNet.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def feature_map(self, x: Tensor) -> Tensor:
        """The last stage's output before pooling, (N, ``out_dim``, h, w)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: Tensor) -> Tensor:
        """Pooled features (N, ``out_dim``): the feature map, globally averaged."""
        return torch.flatten(self.avgpool(self.feature_map(x)), 1)


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU stages (32, 64, 128, 256 channels x width); all but the first halve
    the resolution, so a 28 or 32 px image ends as a 4x4 map before pooling."""

    def __init__(self, *, width: float = 1.0, in_channels: int = 3) -> None:
        super().__init__()
        widths = [_scaled(c, width) for c in (32, 64, 128, 256)]
        stages: list[nn.Module] = []
        previous = in_channels
        for i, channels in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages += [
                nn.Conv2d(previous, channels, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            ]
            previous = channels
        self.features = nn.Sequential(*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = previous

    def feature_map(self, x: Tensor) -> Tensor:
        """The last stage's output before pooling, (N, ``out_dim``, h, w)."""
        return self.features[:-2](x)

    def forward(self, x: Tensor) -> Tensor:
        """Pooled features (N, ``out_dim``): the feature map, globally averaged."""
        return self.features(x)


def _resnet18(width: float, in_channels: int, small_images: bool) -> ResNet:
    return ResNet(
        BasicBlock, (2, 2, 2, 2), width=width, in_channels=in_channels, small_images=small_images
    )


def _resnet50(width: float, in_channels: int, small_images: bool) -> ResNet:
    return ResNet(
        Bottleneck, (3, 4, 6, 3), width=width, in_channels=in_channels, small_images=small_images
    )


def _small_cnn(width: float, in_channels: int, small_images: bool) -> SmallCNN:
    # Built for small inputs whatever `small_images` says: there is no stem to adapt.
    return SmallCNN(width=width, in_channels=in_channels)


def _vit_tiny(width: float, in_channels: int, small_images: bool) -> ViT:
    return build_vit("vit_tiny", width=width, in_channels=in_channels, small_images=small_images)


def _vit_small(width: float, in_channels: int, small_images: bool) -> ViT:
    return build_vit("vit_small", width=width, in_channels=in_channels, small_images=small_images)


# name -> builder(width, in_channels, small_images); each module exposes `out_dim`.
BACKBONES: dict[str, Callable[[float, int, bool], ResNet | SmallCNN | ViT]] = {
    "resnet18": _resnet18,
    "resnet50": _resnet50,
    "small_cnn": _small_cnn,
    "vit_tiny": _vit_tiny,
    "vit_small": _vit_small,
}
BackboneKind = Literal["cnn", "vit", "other"]
_BUILT_IN_KINDS: dict[str, BackboneKind] = {
    "small_cnn": "cnn",
    "resnet18": "cnn",
    "resnet50": "cnn",
    "vit_tiny": "vit",
    "vit_small": "vit",
}


def is_backbone(name: str) -> bool:
    """Whether ``name`` names a backbone: a built-in one or a torchvision / timm model."""
    return name in BACKBONES or is_library_model(name)


def build_backbone(
    name: str, *, width: float = 1.0, in_channels: int = 3, small_images: bool = True
) -> tuple[nn.Module, int]:
    """Build a randomly initialised backbone; return it with its feature dimension D."""
    if split_name(name) is not None:
        if width != 1.0:
            raise ValueError(
                f"backbone width must be 1 for {name} (a library model's size is in its name), "
                f"got {width}"
            )
        return build_library_backbone(name, in_channels, small_images)
    if name not in BACKBONES:
        raise ValueError(
            f"unknown backbone {name!r}; available: {sorted(BACKBONES)}, torchvision:<name> "
            "or timm:<name>"
        )
    if width <= 0:
        raise ValueError(f"backbone width must be > 0, got {width}")
    module = BACKBONES[name](width, in_channels, small_images)
    return module, module.out_dim


@functools.lru_cache(maxsize=64)
def backbone_kind(name: str, small_images: bool = True) -> BackboneKind:
    """``"vit"``, ``"cnn"`` or ``"other"`` (see the module docstring); a library model is
    built once to tell (and to check ``small_images`` suits it)."""
    if name in _BUILT_IN_KINDS:
        return _BUILT_IN_KINDS[name]
    return module_kind(build_backbone(name, small_images=small_images)[0])


def module_kind(module: nn.Module) -> BackboneKind:
    """The kind of a built backbone: ``"vit"`` for one with patch tokens to mask (the
    built-in ViT, a timm ``VisionTransformer``), ``"other"`` for other attention models,
    ``"cnn"`` for the rest."""
    if isinstance(module, ViT) or timm_vit_steps(module) is not None:
        return "vit"
    return "other" if is_attention_model(module) else "cnn"


def image_channels(backbone: nn.Module) -> int:
    """The image channels a backbone reads (what the decoders of dense pretext tasks
    output): a ViT's ``in_channels``, else its first convolution's."""
    channels = getattr(backbone, "in_channels", None)
    if channels is None:
        convs = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
        if not convs:
            raise ValueError(f"cannot tell the input channels of {type(backbone).__name__}")
        channels = convs[0].in_channels
    return int(channels)
