"""Backbones from torchvision and timm: ``torchvision:<name>`` and ``timm:<name>``.

Any classification model either library builds by name serves as an encoder: its classifier
is removed and its pooled pre-logits are the features (timm: ``num_classes=0``; torchvision:
the last ``nn.Linear`` becomes an identity, so MobileNetV3's hidden layer stays, as in timm's
``pre_logits``). The module stays the library's own class with the library's parameter
names, so an exported backbone loads with ``strict=True`` into the same architecture built
by that library. Nothing is ever downloaded: models are built with random weights, and
``model.pretrained`` (pipeline) loads a file.

``small_images`` adapts the stem where there is a known small-image variant, and refuses
otherwise (a ValueError naming what to do):

- ResNet family (torchvision ``ResNet``, timm ``ResNet``): the 7x7 stride-2 convolution and
  max-pool become one 3x3 stride-1 convolution, the CIFAR variant (as the built-in ResNets);
  a deep stem (timm's ResNet-C/D/T) keeps its 3x3 convolutions without the first stride.
- ConvNeXt (torchvision and timm): the 4x4 stride-4 patchify stem becomes a 3x3 stride-1
  convolution, so 32 px images end on a 4x4 map, as a CIFAR ResNet does.
- timm Vision Transformers: 4 px patches on a 32 px reference grid, like the built-in ViTs.

timm ViTs are built with ``dynamic_img_size`` so any input side that is a multiple of the
patch size works (multi-crop, other image sizes). :class:`TimmViTSteps` gives masked image
modelling (MAE, SimMIM) the token steps it needs from a timm ``VisionTransformer``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

TORCHVISION = "torchvision"
TIMM = "timm"
LIBRARIES = (TORCHVISION, TIMM)

# torchvision classification models whose forward returns auxiliary outputs in training.
_AUXILIARY_HEADS = ("googlenet", "inception_v3")


def split_name(name: str) -> tuple[str, str] | None:
    """``("timm", "resnet50")`` for ``"timm:resnet50"``; None for a name without a library."""
    library, sep, arch = name.partition(":")
    return (library, arch) if sep and library in LIBRARIES else None


def library_models(library: str) -> list[str]:
    """The model names ``library`` builds (torchvision's classification models; every timm
    architecture)."""
    if library == TORCHVISION:
        import torchvision  # type: ignore[import-untyped]

        return list(torchvision.models.list_models(module=torchvision.models))
    import timm

    return list(timm.list_models())


def is_library_model(name: str) -> bool:
    """Whether ``name`` is ``torchvision:<model>`` or ``timm:<model>`` of a model that exists."""
    parts = split_name(name)
    if parts is None:
        return False
    library, arch = parts
    if library == TIMM:
        import timm

        return bool(timm.is_model(arch))
    return arch in library_models(library)


def build_library_backbone(
    name: str, in_channels: int, small_images: bool
) -> tuple[nn.Module, int]:
    """Build ``torchvision:<model>`` or ``timm:<model>`` with random weights, classifier
    removed, for ``in_channels``-channel images; return it with its feature dimension."""
    parts = split_name(name)
    if parts is None or not is_library_model(name):
        raise ValueError(f"unknown backbone {name!r}: not a torchvision or timm model name")
    library, arch = parts
    if library == TIMM:
        return _build_timm(arch, in_channels, small_images)
    return _build_torchvision(arch, in_channels, small_images)


def _build_timm(arch: str, in_channels: int, small_images: bool) -> tuple[nn.Module, int]:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    def create(**kwargs: Any) -> Any:  # timm's model classes, typed loosely
        return timm.create_model(
            arch, pretrained=False, num_classes=0, in_chans=in_channels, **kwargs
        )

    model: Any = create()
    if isinstance(model, VisionTransformer):
        # Rebuilt with position embeddings resampled per input size (multi-crop, any size).
        model = create(
            dynamic_img_size=True, **({"patch_size": 4, "img_size": 32} if small_images else {})
        )
    elif small_images:
        _adapt_stem(model, f"timm:{arch}")
    classifier = model.pretrained_cfg.get("classifier")
    model.dropped_head = classifier if isinstance(classifier, str) else ""
    return model, int(model.num_features)


def _build_torchvision(arch: str, in_channels: int, small_images: bool) -> tuple[nn.Module, int]:
    import torchvision

    kwargs: dict[str, Any] = {"aux_logits": False} if arch in _AUXILIARY_HEADS else {}
    model = torchvision.models.get_model(arch, weights=None, **kwargs)
    head_name, head = _last_linear(model, f"torchvision:{arch}")
    parent, _, child = head_name.rpartition(".")
    setattr(model.get_submodule(parent), child, nn.Identity())
    model.dropped_head = head_name
    if small_images:
        _adapt_stem(model, f"torchvision:{arch}")
    _set_input_channels(model, in_channels)
    return model, head.in_features


def _last_linear(model: nn.Module, name: str) -> tuple[str, nn.Linear]:
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{name} has no linear classifier to take pre-logit features from")
    return linears[-1]


def _adapt_stem(model: Any, name: str) -> None:
    """Swap an ImageNet stem for its small-image variant (see the module docstring)."""
    kind = type(model).__name__
    stem = getattr(model, "conv1", None)
    if kind == "ResNet" and isinstance(stem, nn.Conv2d):
        model.conv1 = _stride_one_conv(stem)
        model.maxpool = nn.Identity()
        return
    if kind == "ResNet" and isinstance(stem, nn.Sequential) and isinstance(stem[0], nn.Conv2d):
        # A deep stem (timm's ResNet-C/D/T: three 3x3 convolutions) keeps its kernels and
        # loses its first stride, so its weights still fit.
        stem[0].stride = (1, 1)
        model.maxpool = nn.Identity()
        return
    if kind == "ConvNeXt":
        stem = model.stem if hasattr(model, "stem") else model.features[0]  # timm, torchvision
        if isinstance(stem[0], nn.Conv2d):
            stem[0] = _stride_one_conv(stem[0])
            return
    raise ValueError(
        f"model.small_images=true cannot adapt the stem of {name} (a {kind}): the small-image "
        "stems known are the ResNet and ConvNeXt ones and timm ViTs' 4 px patches. Set "
        "model.small_images=false (the model then downsamples small images by its own "
        "factor; data.image_size can enlarge them) or pick one of those"
    )


def _stride_one_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A 3x3 stride-1 convolution with ``conv``'s channels, freshly initialised."""
    return nn.Conv2d(
        conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=conv.bias is not None
    )


def _set_input_channels(model: nn.Module, in_channels: int) -> None:
    """Torchvision models take RGB; replace the first convolution for other channel counts."""
    name, first = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    if first.in_channels == in_channels:
        return
    parent, _, child = name.rpartition(".")
    replacement = nn.Conv2d(
        in_channels,
        first.out_channels,
        first.kernel_size,  # type: ignore[arg-type]
        stride=first.stride,  # type: ignore[arg-type]
        padding=first.padding,  # type: ignore[arg-type]
        dilation=first.dilation,  # type: ignore[arg-type]
        groups=1,
        bias=first.bias is not None,
    )
    setattr(model.get_submodule(parent) if parent else model, child, replacement)


def library_of(module: nn.Module) -> str | None:
    """The library ("timm" or "torchvision") whose class ``module`` is, else None."""
    root = type(module).__module__.split(".")[0]
    return root if root in LIBRARIES else None


def is_attention_model(module: nn.Module) -> bool:
    """Whether any submodule is an attention layer (transformers, Swin, MaxViT): such
    backbones do not take the small tiles that patch-based pretext tasks feed a CNN."""
    return any("Attention" in type(m).__name__ for m in module.modules())


def library_feature_map(module: nn.Module, x: Tensor) -> Tensor:
    """The spatial (N, D, h, w) map before global pooling of a torchvision or timm model."""
    if library_of(module) == TIMM:
        steps = timm_vit_steps(module)
        if steps is not None:
            return steps.feature_map(x)
        features = module.forward_features(x)  # type: ignore[operator]
        if features.dim() == 4 and features.shape[1] == module.num_features:
            return features
        raise ValueError(f"timm {type(module).__name__} has no (N, C, h, w) feature map")
    pools = [m for m in module.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    if not pools:
        raise ValueError(f"torchvision {type(module).__name__} has no pooling to read a map before")
    captured: list[Tensor] = []
    hook = pools[-1].register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
    try:
        module(x)
    finally:
        hook.remove()
    return captured[0]


class TimmViTSteps:
    """The token steps of a timm ``VisionTransformer`` that masked image modelling calls
    between (``ssl_models.vit.MaskedImageBackbone``), on the model's own parameters.

    Deviations from timm's forward, all inactive in the configurations built here: patch and
    position dropout are skipped, and register tokens' outputs are dropped from
    :meth:`encode`'s result, which is the class token then the given tokens.
    """

    def __init__(self, vit: Any) -> None:
        self.vit = vit
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.in_channels = int(vit.patch_embed.proj.in_channels)

    def embed_patches(self, x: Tensor) -> Tensor:
        """Patch embeddings (N, L, D), no position or class token."""
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"input size {height}x{width} is not divisible by the patch size "
                f"{self.patch_size}; resize or crop the images to a multiple of it"
            )
        tokens = self.vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
        return self.vit.patch_embed.norm(tokens)

    def patch_position_embeddings(self, grid_h: int, grid_w: int) -> Tensor:
        """The patch tokens' position embeddings (1, grid_h * grid_w, D), resampled."""
        from timm.layers import resample_abs_pos_embed

        prefix = 0 if self.vit.no_embed_class else self.vit.num_prefix_tokens
        return resample_abs_pos_embed(
            self.vit.pos_embed[:, prefix:],
            new_size=(grid_h, grid_w),
            old_size=self.vit.patch_embed.grid_size,
            num_prefix_tokens=0,
        )

    def patch_tokens(self, x: Tensor) -> Tensor:
        """Patch embeddings plus their position embeddings, (N, L, D)."""
        grid_h, grid_w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        return self.embed_patches(x) + self.patch_position_embeddings(grid_h, grid_w)

    def encode(self, tokens: Tensor) -> Tensor:
        """Class (and register) tokens with their position embeddings, then ``tokens``,
        through the blocks and final norm; (N, 1 + L', D), class token first."""
        vit, n = self.vit, tokens.shape[0]
        prefix = [vit.cls_token] + ([vit.reg_token] if vit.reg_token is not None else [])
        prefix_tokens = torch.cat(prefix, dim=1)
        if not vit.no_embed_class:
            prefix_tokens = prefix_tokens + vit.pos_embed[:, : vit.num_prefix_tokens]
        x = torch.cat([prefix_tokens.expand(n, -1, -1), tokens], dim=1)
        x = vit.norm(vit.blocks(vit.norm_pre(x)))
        return torch.cat([x[:, :1], x[:, vit.num_prefix_tokens :]], dim=1)

    def feature_map(self, x: Tensor) -> Tensor:
        """The encoded patch tokens on their grid, (N, D, H / patch, W / patch)."""
        tokens = self.encode(self.patch_tokens(x))[:, 1:]
        grid_h, grid_w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        return tokens.transpose(1, 2).reshape(len(x), -1, grid_h, grid_w)


def timm_vit_steps(module: nn.Module) -> TimmViTSteps | None:
    """:class:`TimmViTSteps` for a timm ``VisionTransformer`` with a class token, else None."""
    if library_of(module) != TIMM:
        return None
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(module, VisionTransformer) or module.cls_token is None:
        return None
    return TimmViTSteps(module)
