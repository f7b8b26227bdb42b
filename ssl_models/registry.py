"""Name -> method lookup, and validation of per-method options.

Each method file registers its class with ``@register("name")``; importing
``ssl_models.methods`` (which ``ssl_models`` does) fills :data:`METHODS`. A method's options
are the keyword-only parameters of its ``__init__`` (everything after ``backbone,
feature_dim``), so adding an option to a method class is all it takes for configs to accept
``method.<option>``.
"""

import logging
from collections.abc import Callable
from typing import Any

from ssl_models.backbones import build_backbone
from ssl_models.method import SSLMethod
from ssl_models.pretrained import BackboneWeights, load_backbone_weights

log = logging.getLogger(__name__)

#: Method name -> class, filled by the ``@register`` decorators of ``ssl_models.methods``.
METHODS: dict[str, type[SSLMethod]] = {}


def register(name: str) -> Callable[[type[SSLMethod]], type[SSLMethod]]:
    """Class decorator: make the method known as ``name`` (``method.name`` in configs)."""

    def add(cls: type[SSLMethod]) -> type[SSLMethod]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        METHODS[name] = cls
        return cls

    return add


def method_class(name: str) -> type[SSLMethod]:
    """The class registered as ``name``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name]


def method_params(name: str) -> dict[str, Any]:
    """The options method ``name`` accepts, mapped to their default values."""
    return method_class(name).option_defaults()


def build_method(
    name: str,
    *,
    backbone: str,
    width: float,
    in_channels: int,
    small_images: bool = True,
    num_images: int | None = None,
    backbone_weights: BackboneWeights | None = None,
    **method_kwargs: Any,
) -> SSLMethod:
    """Build method ``name`` on a fresh backbone; ``method_kwargs`` are its options, checked
    by the method's ``validate`` first.

    ``num_images`` (the training-set size) is required by, and only passed to, methods
    that keep per-image state (``requirements(...).image_indices``). ``backbone_weights``
    start the backbone (before the method copies it, e.g. into a momentum encoder).
    """
    allowed = method_params(name)
    for key in method_kwargs:
        if key not in allowed:
            raise ValueError(
                f"unknown option {key!r} for method {name!r}; allowed: {sorted(allowed)}"
            )
    cls = method_class(name)
    options = allowed | method_kwargs
    cls.validate(options)
    encoder, feature_dim = build_backbone(
        backbone, width=width, in_channels=in_channels, small_images=small_images
    )
    if backbone_weights is not None:
        skipped = load_backbone_weights(encoder, backbone_weights)
        if skipped:
            log.info("%s: skipped the classifier's keys %s", backbone_weights.source, skipped)
    if not cls.requirements(options).image_indices:
        return cls(encoder, feature_dim, **method_kwargs)
    if num_images is None:
        raise ValueError(f"method {name!r} keeps one entry per image: pass num_images")
    # Such a method's __init__ takes num_images after feature_dim; the base class's does not.
    build_with_indices: Callable[..., SSLMethod] = cls
    return build_with_indices(encoder, feature_dim, num_images, **method_kwargs)
