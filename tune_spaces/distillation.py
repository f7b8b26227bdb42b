"""Teacher-student methods without negatives: the EMA momentum of the target network (BYOL,
Grill et al. 2020, Table 20), for SimSiam weight decay (Chen & He 2021 use 1e-4; the
method leans on it to keep the predictor from collapsing), and for DINO the teacher
temperature (Caron et al. 2021: 0.04-0.07, unstable above) and EMA momentum (0.996, 0.9995
suggested for small batches), plus the number of multi-crop local views."""

from tune_spaces.common import COMMON, Space

BYOL: Space = {**COMMON, "method.base_momentum": {"uniform": [0.9, 0.999]}}

SIMSIAM: Space = {**COMMON, "train.weight_decay": {"loguniform": [1e-5, 1e-3]}}

DINO: Space = {
    **COMMON,
    "method.teacher_temp": {"uniform": [0.04, 0.07]},
    "method.base_momentum": {"uniform": [0.99, 0.9995]},
    "augment.local_crops": {"choice": [0, 2, 6]},
}
