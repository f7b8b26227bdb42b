"""Self-supervised losses, one per file."""

from ssl_models.losses.barlow_twins import barlow_twins_loss
from ssl_models.losses.byol import byol_loss
from ssl_models.losses.classification import classification_loss
from ssl_models.losses.cosine import negative_cosine_similarity
from ssl_models.losses.dino import dino_loss
from ssl_models.losses.info_nce import info_nce_loss
from ssl_models.losses.masked_pixels import masked_pixel_loss
from ssl_models.losses.nce import nce_loss
from ssl_models.losses.nt_xent import NTXentLoss, nt_xent_loss
from ssl_models.losses.vicreg import vicreg_loss

__all__ = [
    "NTXentLoss",
    "barlow_twins_loss",
    "byol_loss",
    "classification_loss",
    "dino_loss",
    "info_nce_loss",
    "masked_pixel_loss",
    "nce_loss",
    "negative_cosine_similarity",
    "nt_xent_loss",
    "vicreg_loss",
]
