"""Self-supervised learning models: backbones, heads, losses, methods and optimisers.

Start with ``build_method("simclr", backbone="resnet18", width=1.0, in_channels=3)``; a
method's ``forward(views)`` returns the loss to backpropagate and scalars to log.
"""

from ssl_models.backbones import BACKBONES, build_backbone
from ssl_models.method import SSLMethod
from ssl_models.registry import METHODS, build_method

__all__ = ["BACKBONES", "METHODS", "SSLMethod", "build_backbone", "build_method"]
