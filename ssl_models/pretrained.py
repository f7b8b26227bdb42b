"""Starting a backbone from saved weights (``model.pretrained``), with an exact key check.

The file's keys must be the backbone's own parameter and buffer names, as ``export``
writes them and as torchvision / timm name theirs. The one allowance: a library model's
checkpoint may still hold its classifier (``fc.*``, ``head.*``, ``classifier.2.*``), which
the backbone dropped for its pre-logit features; those keys are skipped and returned so the
caller can say so. Anything else that does not match, a missing key, an unexpected key or a
shape, stops with every mismatch listed, rather than training from a half-loaded encoder.
"""

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class BackboneWeights:
    """Tensors to start a backbone from, and where they came from (for messages)."""

    tensors: Mapping[str, torch.Tensor]
    source: str


class WeightsMismatch(ValueError):
    """A weights file does not fit the backbone; the message lists every mismatch."""


def dropped_head_keys(backbone: nn.Module, keys: list[str]) -> list[str]:
    """The keys that belong to the classifier the library backbone dropped (none for the
    built-in backbones, which never had one)."""
    head = getattr(backbone, "dropped_head", "")
    return [key for key in keys if head and key.startswith(f"{head}.")]


def load_backbone_weights(backbone: nn.Module, weights: BackboneWeights) -> list[str]:
    """Copy ``weights`` into ``backbone`` (strictly, but for a dropped classifier's keys,
    which are returned); raise :class:`WeightsMismatch` naming their source otherwise."""
    own = backbone.state_dict()
    tensors, source = weights.tensors, weights.source
    skipped = dropped_head_keys(backbone, [key for key in tensors if key not in own])
    given = {key: value for key, value in tensors.items() if key not in skipped}
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    shapes = sorted(
        f"{key}: file {tuple(given[key].shape)}, backbone {tuple(own[key].shape)}"
        for key in set(own) & set(given)
        if given[key].shape != own[key].shape
    )
    if missing or unexpected or shapes:
        problems = [
            f"{label} ({len(items)}): {', '.join(items)}"
            for label, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", shapes),
            )
            if items
        ]
        raise WeightsMismatch(
            f"the weights in {source} do not fit the backbone {type(backbone).__name__}; "
            + "; ".join(problems)
        )
    backbone.load_state_dict(given, strict=True)
    return skipped
