"""The features an evaluation can ask for, by name.

``trained`` is the checkpoint's frozen encoder, ``random_init`` the same architecture with the
run's seed and random weights (the floor of every protocol), and ``raw_pixels`` the
flattened, L2-normalised images (the floor a useful encoder must beat). The embedding pass
(pipeline.eval.embed) computes them and the evaluation context (pipeline.eval.evaluate) asks
for them; both name them from here, so evaluate imports embed and never the other way round.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

ENCODER_FEATURES = ("trained", "random_init", "raw_pixels")


def check_encoder(encoder: str) -> None:
    """ValueError unless ``encoder`` is one of ``ENCODER_FEATURES``."""
    if encoder not in ENCODER_FEATURES:
        raise ValueError(f"encoder must be one of {ENCODER_FEATURES}, got {encoder!r}")


def raw_pixel_features(pixels: np.ndarray) -> Tensor:
    """The raw-pixel floor's features of uint8 images (N, C, H, W): flattened, L2-normalised."""
    return F.normalize(torch.from_numpy(pixels).flatten(1).float(), dim=1)
