"""Negative cosine similarity, the loss shared by SimSiam and (rescaled) BYOL.

SimSiam (Chen & He 2021, "Exploring Simple Siamese Representation Learning",
arXiv:2011.10566, eq. 1) minimises ``D(p, z) = -cos(p, z)``; BYOL (Grill et al. 2020,
arXiv:2006.07733, eq. 2) minimises the squared distance of the l2-normalised vectors,
``||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z)``, i.e. ``2 + 2 D(p, z)`` -- the same gradient
direction at twice the scale. Both are written through :func:`negative_cosine_similarity`.

The stop-gradient on ``z`` is the caller's job (``z.detach()`` or a ``no_grad`` target), so
the function stays a plain, differentiable similarity.
"""

import torch.nn.functional as F
from torch import Tensor


def negative_cosine_similarity(p: Tensor, z: Tensor) -> Tensor:
    """Mean over the batch of ``-cos(p_i, z_i)``, in [-1, 1].

    Args:
        p: (N, d) predictions.
        z: (N, d) targets; row i pairs with row i of ``p``.
    """
    # float32 even under bf16 autocast: the normalisation is precision-sensitive.
    return -F.cosine_similarity(p.float(), z.float(), dim=-1).mean()
