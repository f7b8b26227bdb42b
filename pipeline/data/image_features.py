"""Features of decoded images held in memory: an encoder over normalised uint8 batches.

The one way the pipeline turns decoded images into L2-normalised features (the form weighted
kNN compares by cosine similarity): pretraining's online kNN monitor, the evaluation's
embedding actors and the retrieval pictures all call it, so their features agree. It sits
in the data layer, next to the decoding and normalisation it builds on, where both training
and evaluation can reach it; the encoder is any callable, so no model code is imported.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.data.ingest import normalize


@torch.no_grad()
def extract_features(
    encoder: Callable[[Tensor], Tensor],
    pixels: np.ndarray,
    mean: Tensor,
    std: Tensor,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Features of uint8 images (N, C, H, W) in batches, L2-normalised, on the CPU."""
    out = []
    for start in range(0, len(pixels), batch_size):
        batch = torch.from_numpy(pixels[start : start + batch_size]).to(device)
        out.append(
            F.normalize(
                encoder(normalize(batch, mean.to(device), std.to(device))).float(), dim=1
            ).cpu()
        )
    return torch.cat(out)
