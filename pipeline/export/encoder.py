"""A run's trained encoder, ready to use outside the pipeline.

:func:`load_encoder` is the Python API: ``model, preprocess = load_encoder("runs/NAME")``.
``model`` is the trained backbone in eval mode: the torchvision or timm class itself for a
``torchvision:`` / ``timm:`` backbone and a ``torchvision.models.ResNet`` for the built-in
ResNets; ``model(x)`` gives the pooled features (N, D). ``preprocess`` turns a PIL image into
the (C, H, W) float tensor the run trained on: decoded and resized as the data stage does
(grey or RGB, resize + centre crop to the run's image size), scaled to [0, 1] and normalised
with the training set's per-channel statistics.

:class:`EmbeddingModel` is what TorchScript and ONNX exports hold: normalisation, the
method's evaluation features and L2 normalisation in one graph, so that ``embed``'s
embeddings come out of a [0, 1] image batch with nothing else to apply.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from pipeline.data.ingest import ImageSpec, decode_image
from pipeline.train.checkpoint import CheckpointState, find_checkpoint, method_from_checkpoint
from ssl_models import SSLMethod


@dataclass(frozen=True)
class Preprocess:
    """PIL image -> normalised (C, H, W) float tensor, the way the run's images were fed."""

    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def pixels(self, image: Image.Image) -> np.ndarray:
        """The image as the data stage decodes it: (C, size, size) uint8."""
        return _decoded(image, ImageSpec(size=self.image_size, channels=self.channels))

    def __call__(self, image: Image.Image) -> Tensor:
        """The normalised float tensor (C, H, W) of ``image``."""
        scaled = torch.from_numpy(self.pixels(image).copy()).float().div_(255)
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        return (scaled - mean) / torch.tensor(self.std).view(-1, 1, 1)


def _decoded(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """Decode through the data stage's own function, so sizes and modes match exactly."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless: the pixels decode_image sees are the image's
    return decode_image(buffer.getvalue(), spec)


def preprocess_for(state: CheckpointState) -> Preprocess:
    """The preprocessing of the run that wrote ``state``."""
    return Preprocess(state.channels, state.image_size, tuple(state.mean), tuple(state.std))


def features_module(method: SSLMethod) -> nn.Module:
    """What evaluation embeds: the backbone, or the whole method for one whose evaluation
    features are not the backbone's output (CPC pools patch embeddings)."""
    if type(method).features is SSLMethod.features:
        return method.backbone
    return _MethodFeatures(method)


class _MethodFeatures(nn.Module):
    def __init__(self, method: SSLMethod) -> None:
        super().__init__()
        self.method = method

    def forward(self, images: Tensor) -> Tensor:
        return self.method.features(images)


class EmbeddingModel(nn.Module):
    """[0, 1] images (N, C, H, W) -> L2-normalised features (N, D), as ``embed`` writes them."""

    mean: Tensor  # (1, C, 1, 1) buffers
    std: Tensor

    def __init__(self, features: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.features = features
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        """Normalise, embed, L2-normalise."""
        return F.normalize(self.features((images - self.mean) / self.std).float(), dim=1)


def load_encoder(run: str | os.PathLike[str]) -> tuple[nn.Module, Callable[[Image.Image], Tensor]]:
    """The trained backbone of a run (its latest checkpoint; or a checkpoint directory or
    file; local path or object-storage URI) in eval mode, and its :class:`Preprocess`::

        from pipeline import load_encoder
        model, preprocess = load_encoder("runs/fmnist-simclr-demo")
        features = model(preprocess(Image.open("shirt.png")).unsqueeze(0))
    """
    method, _, state = method_from_checkpoint(find_checkpoint(run))
    return method.backbone.eval(), preprocess_for(state)
