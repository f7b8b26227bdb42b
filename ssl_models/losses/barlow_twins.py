"""The Barlow Twins redundancy-reduction loss.

Zbontar et al. 2021, "Barlow Twins: Self-Supervised Learning via Redundancy Reduction",
arXiv:2103.03230, eq. (1)-(2). Each embedding dimension is standardised over the batch, the
two views' embeddings are cross-correlated, and the loss pushes the cross-correlation matrix
towards the identity:

    z_a_norm = (z_a - z_a.mean(0)) / z_a.std(0)          # over the GLOBAL batch of N rows
    z_b_norm = (z_b - z_b.mean(0)) / z_b.std(0)
    C = z_a_norm.T @ z_b_norm / N                         # (d, d) cross-correlation
    loss = sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2

Distributed version. The reference implementation gets global statistics from a
SyncBatchNorm (``nn.BatchNorm1d(affine=False)``: biased variance, eps inside the square
root) and sums ``C`` with a plain ``all_reduce``, which has no backward. Here every global
quantity is a sum of per-rank partial sums taken with :func:`all_reduce_sum_with_grad`:

1. the row count and the per-dimension sums of ``z_a`` and ``z_b`` (one collective) give
   the global means;
2. the per-dimension sums of squared deviations from those means (one collective) give
   the biased global variances -- two passes rather than ``E[z^2] - E[z]^2``, which
   cancels catastrophically when the means are large compared with the spread;
3. the partial products ``z_a_norm_r.T @ z_b_norm_r`` (one collective) give ``C``.

Every rank thus computes the same loss L, and every path from a rank's rows to L passes
through these sums, so the backward hands each rank R * dL/dz for its own rows and DDP's
averaging yields exactly the single-process gradient (see ``ssl_models.dist``). Shapes must
match across ranks (``drop_last`` batches), as for every collective here.
"""

import torch
from torch import Tensor, nn

from ssl_models.dist import all_reduce_sum_with_grad


def barlow_twins_loss(
    z_a: Tensor, z_b: Tensor, lambda_offdiag: float, *, eps: float = 1e-5
) -> Tensor:
    """Barlow Twins loss over the global batch; the same value on every rank.

    Args:
        z_a: (n, d) embeddings of the first view, this rank's rows only.
        z_b: (n, d) embeddings of the second view; row i pairs with row i of ``z_a``.
        lambda_offdiag: weight of the redundancy-reduction (off-diagonal) term.
        eps: added to the variance before the square root, as in ``nn.BatchNorm1d``.
    """
    if z_a.shape != z_b.shape or z_a.ndim != 2:
        raise ValueError(
            f"expected two (n, d) tensors of equal shape, got {z_a.shape}, {z_b.shape}"
        )
    n, d = z_a.shape

    # 1. Global row count and means.
    local = torch.cat([z_a.sum(0), z_b.sum(0), z_a.new_tensor([float(n)])])
    total = all_reduce_sum_with_grad(local)
    big_n = total[-1]
    mean_a, mean_b = (total[:-1] / big_n).split(d)

    # 2. Biased global variances from squared deviations, then standardise.
    dev_a, dev_b = z_a - mean_a, z_b - mean_b
    squares = all_reduce_sum_with_grad(torch.cat([dev_a.pow(2).sum(0), dev_b.pow(2).sum(0)]))
    var_a, var_b = (squares / big_n).split(d)
    a_norm = dev_a / torch.sqrt(var_a + eps)
    b_norm = dev_b / torch.sqrt(var_b + eps)

    # 3. Cross-correlation: per-rank partial sums, summed over ranks with gradient.
    c = all_reduce_sum_with_grad(a_norm.T @ b_norm) / big_n
    on_diag = (1 - torch.diagonal(c)).pow(2).sum()
    off_mask = ~torch.eye(d, dtype=torch.bool, device=c.device)
    off_diag = c[off_mask].pow(2).sum()
    return on_diag + lambda_offdiag * off_diag


class BarlowTwinsLoss(nn.Module):
    """Module form of :func:`barlow_twins_loss` holding the off-diagonal weight."""

    def __init__(self, lambda_offdiag: float = 0.0051) -> None:
        super().__init__()
        if lambda_offdiag < 0:
            raise ValueError(f"lambda_offdiag must be >= 0, got {lambda_offdiag}")
        self.lambda_offdiag = lambda_offdiag

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        """The loss of two (N, D) embedding batches."""
        return barlow_twins_loss(z_a, z_b, self.lambda_offdiag)
