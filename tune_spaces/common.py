"""Knobs every method shares: learning rate, global batch size and augmentation strength.

A space maps a dotted config key to one distribution, written as plain data so that a YAML
file or a ``--space-set`` flag can override it:

    {"loguniform": [low, high]}   {"uniform": [low, high]}
    {"randint": [low, high]}      {"choice": [a, b, ...]}
"""

from typing import Any

Space = dict[str, dict[str, Any]]

COMMON: Space = {
    # Around the LARS rates that learn fastest at batch 256 on small images
    # (benchmarks/RESULTS.md); the rate is scaled by batch / 256 in training.
    "train.base_lr": {"loguniform": [0.05, 1.0]},
    # Global batch; every choice divides by 1, 2 and 4 workers.
    "train.batch_size": {"choice": [128, 256, 512]},
    # The SimCLR colour-distortion strength s and the smallest crop area.
    "augment.strength": {"uniform": [0.25, 1.0]},
    "augment.crop_scale_min": {"uniform": [0.08, 0.5]},
}
