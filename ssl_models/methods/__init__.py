"""Self-supervised methods, one per file."""

from ssl_models.methods.simclr import SimCLR

__all__ = ["SimCLR"]
