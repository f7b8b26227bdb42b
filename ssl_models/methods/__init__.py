"""Self-supervised methods, one per file."""

from ssl_models.methods.byol import BYOL
from ssl_models.methods.instdisc import InstDisc
from ssl_models.methods.simclr import SimCLR
from ssl_models.methods.simsiam import SimSiam

__all__ = ["BYOL", "InstDisc", "SimCLR", "SimSiam"]
