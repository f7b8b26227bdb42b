"""InfoNCE with momentum keys, the contrastive loss of MoCo v1/v2 and MoCo v3.

Oord et al. 2018 (arXiv:1807.03748); in MoCo's form (He et al. 2020, arXiv:1911.05722,
eq. (1)) each query ``q_i`` has exactly one positive key ``k_i`` (another view of the same
image, encoded by the momentum encoder) among a set of candidate keys, and the loss is the
cross-entropy of picking it:

    l_i = -log( exp(q_i . k_i / t) / sum_{c in candidates_i} exp(q_i . c / t) )

Both MoCo generations share this; they differ only in where the negatives come from, which
is the one switch of :func:`info_nce_loss`:

- ``negatives`` given (MoCo v1/v2): candidates_i = {k_i} + the K queued keys. Logits are
  ``[q_i . k_i | q_i . queue]`` of shape (n, 1 + K) and the label is 0 for every row, as in
  MoCo's pseudo-code. The other keys of the current batch are not negatives.
- ``negatives=None`` (MoCo v3): candidates_i = the keys of the whole global batch, gathered
  from every rank in rank order. Logits are ``q @ k_all.T`` of shape (n, N) and row i's
  label is ``rank * n + i``, the column of its own key; the other N - 1 keys are negatives.

Keys and negatives are constants: they are detached here (and gathered without gradient),
so the momentum encoder never receives gradient, in one process or many. Every rank averages
over its own n queries only, so with R equal local batches the single-process loss is the
mean of the per-rank losses and no gradient needs to cross ranks: a rank's gradient w.r.t.
its own queries is R times the single-process gradient for those rows, and DDP's averaging
of parameter gradients over ranks gives exactly the single-process parameter gradient (the
convention of ``ssl_models.dist``).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_models.dist import gather_no_grad, rank


def info_nce_loss(q: Tensor, k: Tensor, negatives: Tensor | None, temperature: float) -> Tensor:
    """InfoNCE averaged over this rank's n queries; inputs are L2-normalised here.

    Args:
        q: (n, d) queries (online branch; carries gradient), this rank's rows only.
        k: (n, d) keys; row i is the positive of ``q[i]``. Treated as constants.
        negatives: (K, d) negatives shared by every query (MoCo's queue), or ``None`` to use
            the keys of the global batch, gathered from all ranks, as candidates (MoCo v3).
        temperature: softmax temperature t > 0.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if q.shape != k.shape:
        raise ValueError(f"queries {tuple(q.shape)} and keys {tuple(k.shape)} must match")
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    if negatives is not None:
        negatives = F.normalize(negatives.detach(), dim=1)
        positive = (q * k).sum(dim=1, keepdim=True)  # (n, 1)
        logits = torch.cat([positive, q @ negatives.T], dim=1) / temperature  # (n, 1 + K)
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    else:
        all_keys = gather_no_grad(k)  # (N, d) in rank order
        logits = q @ all_keys.T / temperature  # (n, N)
        labels = torch.arange(q.shape[0], device=q.device) + rank() * q.shape[0]
    return F.cross_entropy(logits, labels)
