"""Self-supervised learning models: backbones, heads, losses, methods and optimisers.

Start with ``build_method("simclr", backbone="resnet18", width=1.0, in_channels=3)``; a
method's ``forward(Batch(views))`` returns the loss to backpropagate and scalars to log.
"""

import ssl_models.methods  # noqa: F401  (registers every method in METHODS)
from ssl_models.backbones import BACKBONES, build_backbone
from ssl_models.method import Batch, SSLMethod
from ssl_models.registry import METHODS, build_method

__all__ = ["BACKBONES", "METHODS", "Batch", "SSLMethod", "build_backbone", "build_method"]
