"""Self-supervised losses, one per file."""

from ssl_models.losses.nt_xent import NTXentLoss, nt_xent_loss

__all__ = ["NTXentLoss", "nt_xent_loss"]
