"""The VICReg loss: variance-invariance-covariance regularisation.

Bardes, Ponce and LeCun 2022, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning", arXiv:2105.04906, eq. (1)-(6), as the official code computes it:

    inv = mean((z_a - z_b)^2)                               # over the N x d entries
    z = z - z.mean(0); std = sqrt(z.var(0) + eps)           # unbiased var, per branch
    var = (mean(relu(1 - std_a)) + mean(relu(1 - std_b))) / 2
    cov(z) = z.T @ z / (N - 1)
    cov = sum_{i != j} cov(z_a)_ij^2 / d + sum_{i != j} cov(z_b)_ij^2 / d
    loss = sim_weight * inv + var_weight * var + cov_weight * cov

All statistics are over the GLOBAL batch: like the official ``FullGatherLayer``, each rank
gathers every rank's embeddings with :func:`gather_with_grad` and evaluates the loss on the
whole batch (the official code keeps the invariance term local; here it is global too, so
the loss is the single-process loss on the global batch). Every rank thus computes the same
loss L; the gather's backward sums the ranks' gradients, so each rank receives R * dL/dz for
its own rows and DDP's averaging yields exactly the single-process gradient (see
``ssl_models.dist``).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models.dist import gather_with_grad


def _off_diagonal_square_sum(m: Tensor) -> Tensor:
    off_mask = ~torch.eye(m.shape[0], dtype=torch.bool, device=m.device)
    return m[off_mask].pow(2).sum()


def vicreg_loss(
    z_a: Tensor,
    z_b: Tensor,
    sim_weight: float = 25.0,
    var_weight: float = 25.0,
    cov_weight: float = 1.0,
    eps: float = 1e-4,
) -> tuple[Tensor, dict[str, Tensor]]:
    """VICReg loss over the global batch; the same value on every rank.

    Args:
        z_a: (n, d) embeddings of the first view, this rank's rows only.
        z_b: (n, d) embeddings of the second view; row i pairs with row i of ``z_a``.
        sim_weight: weight of the invariance term (paper: 25).
        var_weight: weight of the variance term (paper: 25).
        cov_weight: weight of the covariance term (paper: 1).
        eps: added to the variance before the square root.

    Returns:
        The weighted loss, and the unweighted ``invariance``, ``variance`` and
        ``covariance`` terms, detached, for logging.
    """
    if z_a.shape != z_b.shape or z_a.ndim != 2:
        raise ValueError(
            f"expected two (n, d) tensors of equal shape, got {z_a.shape}, {z_b.shape}"
        )
    all_a, all_b = gather_with_grad(z_a), gather_with_grad(z_b)
    big_n, d = all_a.shape
    if big_n < 2:
        raise ValueError("VICReg needs a global batch of at least 2 rows")

    invariance = F.mse_loss(all_a, all_b)

    all_a = all_a - all_a.mean(0)
    all_b = all_b - all_b.mean(0)
    std_a = torch.sqrt(all_a.pow(2).sum(0) / (big_n - 1) + eps)
    std_b = torch.sqrt(all_b.pow(2).sum(0) / (big_n - 1) + eps)
    variance = (F.relu(1 - std_a).mean() + F.relu(1 - std_b).mean()) / 2

    cov_a = all_a.T @ all_a / (big_n - 1)
    cov_b = all_b.T @ all_b / (big_n - 1)
    covariance = (_off_diagonal_square_sum(cov_a) + _off_diagonal_square_sum(cov_b)) / d

    loss = sim_weight * invariance + var_weight * variance + cov_weight * covariance
    parts = {
        "invariance": invariance.detach(),
        "variance": variance.detach(),
        "covariance": covariance.detach(),
    }
    return loss, parts


class VICRegLoss(nn.Module):
    """Module form of :func:`vicreg_loss` holding the weights."""

    def __init__(
        self,
        sim_weight: float = 25.0,
        var_weight: float = 25.0,
        cov_weight: float = 1.0,
        eps: float = 1e-4,
    ) -> None:
        super().__init__()
        if min(sim_weight, var_weight, cov_weight) < 0:
            raise ValueError("VICReg weights must be >= 0")
        self.sim_weight, self.var_weight, self.cov_weight = sim_weight, var_weight, cov_weight
        self.eps = eps

    def forward(self, z_a: Tensor, z_b: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of two (N, D) embedding batches, and its three terms to log."""
        return vicreg_loss(z_a, z_b, self.sim_weight, self.var_weight, self.cov_weight, self.eps)
