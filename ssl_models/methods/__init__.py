"""Self-supervised methods, one per file."""

from ssl_models.methods.barlow_twins import BarlowTwins
from ssl_models.methods.byol import BYOL
from ssl_models.methods.colorization import Colorization
from ssl_models.methods.context_encoder import ContextEncoder
from ssl_models.methods.cpc import CPC
from ssl_models.methods.deepcluster import DeepCluster
from ssl_models.methods.denoising_ae import DenoisingAutoencoder
from ssl_models.methods.dino import DINO
from ssl_models.methods.exemplar import ExemplarCNN
from ssl_models.methods.instdisc import InstDisc
from ssl_models.methods.jigsaw import Jigsaw
from ssl_models.methods.mae import MAE
from ssl_models.methods.moco_v2 import MoCoV2
from ssl_models.methods.moco_v3 import MoCoV3
from ssl_models.methods.multitask import MultiTask
from ssl_models.methods.pirl import PIRL
from ssl_models.methods.relative_patch import RelativePatch
from ssl_models.methods.rotation import RotNet
from ssl_models.methods.simclr import SimCLR
from ssl_models.methods.simmim import SimMIM
from ssl_models.methods.simsiam import SimSiam
from ssl_models.methods.swav import SwAV
from ssl_models.methods.vicreg import VICReg

__all__ = [
    "BYOL",
    "CPC",
    "DINO",
    "MAE",
    "BarlowTwins",
    "Colorization",
    "ContextEncoder",
    "DeepCluster",
    "DenoisingAutoencoder",
    "ExemplarCNN",
    "InstDisc",
    "Jigsaw",
    "MoCoV2",
    "MoCoV3",
    "MultiTask",
    "PIRL",
    "RelativePatch",
    "RotNet",
    "SimCLR",
    "SimMIM",
    "SimSiam",
    "SwAV",
    "VICReg",
]
