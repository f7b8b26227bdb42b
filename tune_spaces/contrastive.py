"""Contrastive methods: the temperature matters most (SimCLR, Chen et al. 2020, Table 5),
then the number and freshness of negatives (MoCo's queue length and key-encoder momentum)."""

from tune_spaces.common import COMMON, Space

SIMCLR: Space = {**COMMON, "method.temperature": {"loguniform": [0.05, 0.5]}}

MOCO_V2: Space = {
    **COMMON,
    "method.temperature": {"loguniform": [0.05, 0.5]},
    "method.momentum": {"uniform": [0.99, 0.9995]},
    # Multiples of every batch choice in COMMON, as the queue requires.
    "method.queue_size": {"choice": [4096, 8192, 16384]},
}

MOCO_V3: Space = {
    **COMMON,
    "method.temperature": {"loguniform": [0.1, 1.0]},
    "method.base_momentum": {"uniform": [0.9, 0.999]},
}

INSTDISC: Space = {
    **COMMON,
    "method.temperature": {"loguniform": [0.03, 0.3]},
    "method.bank_momentum": {"uniform": [0.3, 0.9]},
}
