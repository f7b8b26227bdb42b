"""Masked-image modelling (MAE, SimMIM): the mask ratio, and AdamW's learning rate and weight
decay. MAE (He et al. 2022, Fig. 5) finds 75% masking best, with a wide good range around
it; SimMIM (Xie et al. 2022) masks 60% of its blocks.

Both papers train with AdamW (MAE: base lr 1.5e-4 per 256 images, weight decay 0.05;
SimMIM: 8e-4 at batch 2048, 0.05), not LARS, so these spaces pin ``train.optimizer`` to
``adamw`` and search ``train.base_lr`` on AdamW's scale (training multiplies it by
batch / 256); small models on small images take rates above the papers'. Neither paper
uses colour distortion: the spaces search the crop scale (MAE's smallest is 0.2), not
``augment.strength``, which the base config should set to 0.
"""

from tune_spaces.common import COMMON, Space

_ADAMW: Space = {
    "train.optimizer": {"choice": ["adamw"]},
    "train.base_lr": {"loguniform": [1e-4, 3e-3]},
    "train.weight_decay": {"loguniform": [0.01, 0.2]},
    "train.batch_size": COMMON["train.batch_size"],
    "augment.crop_scale_min": {"uniform": [0.2, 0.6]},
}

MAE: Space = {**_ADAMW, "method.mask_ratio": {"uniform": [0.6, 0.9]}}

SIMMIM: Space = {**_ADAMW, "method.mask_ratio": {"uniform": [0.4, 0.8]}}
