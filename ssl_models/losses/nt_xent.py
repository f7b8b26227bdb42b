"""NT-Xent, the normalised temperature-scaled cross-entropy loss of SimCLR.

Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations",
arXiv:2002.05709, eq. (1). For a global batch of N pairs there are 2N embeddings; each one is
an anchor whose positive is the other view of the same image and whose negatives are the
other 2N - 2 embeddings:

    l(i, j) = -log( exp(sim(z_i, z_j) / t) / sum_{k != i} exp(sim(z_i, z_k) / t) )

With several workers, each rank uses only its own 2n embeddings as anchors but compares
them with all 2N gathered embeddings, so the negatives match single-process training; see
``ssl_models.dist`` for why the gradients match too.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models.dist import gather_with_grad, rank


def nt_xent_loss(z_a: Tensor, z_b: Tensor, temperature: float) -> Tensor:
    """NT-Xent averaged over this rank's 2n anchors.

    Args:
        z_a: (n, d) projections of the first view, this rank's rows only.
        z_b: (n, d) projections of the second view; row i pairs with row i of ``z_a``.
        temperature: softmax temperature t > 0.
    """
    n = z_a.shape[0]
    z_a = F.normalize(z_a, dim=1)
    z_b = F.normalize(z_b, dim=1)

    # Candidates are laid out [all view-a rows; all view-b rows] over the global batch.
    all_a, all_b = gather_with_grad(z_a), gather_with_grad(z_b)
    big_n = all_a.shape[0]
    candidates = torch.cat([all_a, all_b])
    anchors = torch.cat([z_a, z_b])
    logits = anchors @ candidates.T / temperature  # (2n, 2N): cosine similarity / t

    # This rank's row i is global row rank * n + i.
    own = torch.arange(n, device=z_a.device) + rank() * n
    self_column = torch.cat([own, own + big_n])
    positive_column = torch.cat([own + big_n, own])

    # An embedding is not its own negative: drop it from the softmax denominator.
    rows = torch.arange(2 * n, device=z_a.device)
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[rows, self_column] = True
    logits = logits.masked_fill(is_self, float("-inf"))
    return F.cross_entropy(logits, positive_column)


class NTXentLoss(nn.Module):
    """Module form of :func:`nt_xent_loss` holding the temperature."""

    def __init__(self, temperature: float = 0.2) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        """The loss of two (N, D) embedding batches, row i of each the same image."""
        return nt_xent_loss(z_a, z_b, self.temperature)
