"""Teacher-student methods without negatives: the EMA momentum of the target network (BYOL,
Grill et al. 2020, Table 20) and, for SimSiam, weight decay (Chen & He 2021 use 1e-4; the
method leans on it to keep the predictor from collapsing)."""

from tune_spaces.common import COMMON, Space

BYOL: Space = {**COMMON, "method.base_momentum": {"uniform": [0.9, 0.999]}}

SIMSIAM: Space = {**COMMON, "train.weight_decay": {"loguniform": [1e-5, 1e-3]}}
