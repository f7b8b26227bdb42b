"""BYOL's regression loss (Grill et al. 2020, "Bootstrap Your Own Latent", arXiv:2006.07733,
eq. 2): the mean squared error between the l2-normalised prediction and target,

    L(p, z) = || p/|p| - z/|z| ||^2 = 2 - 2 cos(p, z)

It is expressed through the shared :func:`~ssl_models.losses.cosine.negative_cosine_similarity`
(``2 + 2 * (-cos)``). ``z`` comes from the momentum target and must carry no gradient; the
caller makes sure of that.
"""

from torch import Tensor

from ssl_models.losses.cosine import negative_cosine_similarity


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """Mean over the batch of ``2 - 2 cos(p_i, z_i)``, in [0, 4].

    Args:
        p: (N, d) online predictions.
        z: (N, d) target projections (treated as constants).
    """
    return 2 + 2 * negative_cosine_similarity(p, z)
