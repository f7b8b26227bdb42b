"""The backbone a run starts from: its ``model.pretrained`` weights, and a check on the
driver, before Ray starts, that the backbone takes the run's views.

A weights file is a safetensors file or a torch ``state_dict`` saved with ``torch.save``, at
a local path or an object-storage URI. torch files are read with ``weights_only=True``, so a
file cannot run code; nothing is downloaded from a model hub.
"""

from __future__ import annotations

import io

import torch

from pipeline.config import Config, ConfigError
from pipeline.data import locations
from pipeline.train.views import view_recipes
from ssl_models import build_backbone
from ssl_models.pretrained import BackboneWeights, load_backbone_weights


def read_backbone_weights(location: str) -> BackboneWeights:
    """The tensors of a safetensors or torch state_dict file; ValueError naming the file
    when it holds anything else."""
    data = locations.read_bytes(location)
    if location.endswith(".safetensors"):
        from safetensors.torch import load

        return BackboneWeights(load(data), location)
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # a pickle that is not plain tensors, or not a torch file
        raise ValueError(f"{location} is not a torch state_dict file ({error})") from None
    if not isinstance(loaded, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()
    ):
        raise ValueError(
            f"{location} holds a {type(loaded).__name__}, not a state_dict of named tensors"
        )
    return BackboneWeights(loaded, location)


def run_backbone_weights(config: Config) -> BackboneWeights | None:
    """``model.pretrained``'s weights, or None for a randomly initialised backbone."""
    if config.model.pretrained is None:
        return None
    return read_backbone_weights(config.model.pretrained)


def check_backbone(config: Config, channels: int, image_size: int) -> None:
    """Build the run's backbone, load its ``model.pretrained`` weights and pass a batch of
    every view size through it; a ConfigError naming the key when that fails, so a weights
    file or an architecture that does not fit the data stops before Ray starts."""
    model = config.model
    backbone, _ = build_backbone(
        model.backbone, width=model.width, in_channels=channels, small_images=model.small_images
    )
    try:
        weights = run_backbone_weights(config)
        if weights is not None:
            load_backbone_weights(backbone, weights)
    except (OSError, ValueError) as error:  # unreadable, not a state_dict, or a mismatch
        raise ConfigError(f"config key 'model.pretrained': {error}") from None
    sizes = sorted({recipe.size for recipe in view_recipes(config, image_size)})
    backbone.eval()
    for size in sizes:
        try:
            with torch.no_grad():
                backbone(torch.zeros(2, channels, size, size))
        except Exception as error:  # whatever the architecture raises on that input
            raise ConfigError(
                f"config key 'model.backbone': {config.model.backbone} cannot take the run's "
                f"{channels}x{size}x{size} views ({type(error).__name__}: {error}); change "
                "data.image_size, augment.local_size or the backbone"
            ) from None
