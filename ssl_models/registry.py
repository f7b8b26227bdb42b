"""Name -> method lookup, and validation of per-method options.

A method's options are the keyword-only parameters of its ``__init__`` (everything after
``backbone, feature_dim``), so adding an option to a method class is all it takes for
configs to accept ``method.<option>``.
"""

import inspect
from typing import Any

from ssl_models.backbones import build_backbone
from ssl_models.method import SSLMethod
from ssl_models.methods import (
    BYOL,
    CPC,
    DINO,
    MAE,
    PIRL,
    BarlowTwins,
    Colorization,
    ContextEncoder,
    DeepCluster,
    DenoisingAutoencoder,
    ExemplarCNN,
    InstDisc,
    Jigsaw,
    MoCoV2,
    MoCoV3,
    MultiTask,
    RelativePatch,
    RotNet,
    SimCLR,
    SimMIM,
    SimSiam,
    SwAV,
    VICReg,
)

METHODS: dict[str, type[SSLMethod]] = {
    "simclr": SimCLR,
    "instdisc": InstDisc,
    "moco_v2": MoCoV2,
    "moco_v3": MoCoV3,
    "byol": BYOL,
    "simsiam": SimSiam,
    "barlow_twins": BarlowTwins,
    "vicreg": VICReg,
    "swav": SwAV,
    "deepcluster": DeepCluster,
    "dino": DINO,
    "mae": MAE,
    "simmim": SimMIM,
    # Pretext tasks (Methods III): their views are made by pretext_views in the data stage.
    "rotation": RotNet,
    "relative_patch": RelativePatch,
    "context_encoder": ContextEncoder,
    "denoising_ae": DenoisingAutoencoder,
    "jigsaw": Jigsaw,
    "colorization": Colorization,
    "exemplar": ExemplarCNN,
    "pirl": PIRL,
    "cpc": CPC,
    "multitask": MultiTask,
}


def _method_class(name: str) -> type[SSLMethod]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name]


def method_params(name: str) -> dict[str, Any]:
    """The options method ``name`` accepts, mapped to their default values."""
    signature = inspect.signature(_method_class(name).__init__)
    return {
        p.name: p.default
        for p in signature.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def build_method(
    name: str,
    *,
    backbone: str,
    width: float,
    in_channels: int,
    small_images: bool = True,
    num_images: int | None = None,
    **method_kwargs: Any,
) -> SSLMethod:
    """Build method ``name`` on a fresh backbone; ``method_kwargs`` are its options.

    ``num_images`` (the training-set size) is required by, and only passed to, methods
    that keep per-image state (``uses_image_indices``).
    """
    allowed = method_params(name)
    for key in method_kwargs:
        if key not in allowed:
            raise ValueError(
                f"unknown option {key!r} for method {name!r}; allowed: {sorted(allowed)}"
            )
    encoder, feature_dim = build_backbone(
        backbone, width=width, in_channels=in_channels, small_images=small_images
    )
    cls = _method_class(name)
    if not cls.uses_image_indices:
        return cls(encoder, feature_dim, **method_kwargs)
    if num_images is None:
        raise ValueError(f"method {name!r} keeps one entry per image: pass num_images")
    return cls(encoder, feature_dim, num_images, **method_kwargs)
