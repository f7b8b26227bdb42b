"""SwAV's online codes and swapped-prediction loss.

Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments", arXiv:2006.09882, Section 3.1 and Algorithm 1 (Appendix A.1):

    # Sinkhorn-Knopp
    def sinkhorn(scores, eps=0.05, niters=3):
        Q = exp(scores / eps).T                  # K x B
        Q /= sum(Q)
        K, B = Q.shape
        r, c = ones(K) / K, ones(B) / B          # equipartition of the batch over prototypes
        for _ in range(niters):
            Q *= (r / sum(Q, dim=1)).unsqueeze(1)     # each prototype gets weight 1/K
            Q *= (c / sum(Q, dim=0)).unsqueeze(0)     # each sample gets weight 1/B
        return (Q / sum(Q, dim=0, keepdim=True)).T    # every row an assignment (sums to 1)

    # swapped prediction, multi-crop form: codes of the assignment crops only
    loss = mean_i mean_{v != i} -mean(q_i * log(softmax(scores_v / temp)))

Distributed version (the official ``distributed_sinkhorn``): every rank holds its own
samples' columns of Q. The total of Q and the prototype (row) sums are all-reduced, so
the row normalisation sees the whole batch; the column normalisation is per sample and
needs no communication, only the global batch size B = n * world_size. Each rank thus
gets exactly its rows of the single-process codes. Ranks must hold equal numbers of rows.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_models.dist import all_reduce_sum, world_size


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """Codes Q (n, K) of this rank's ``scores`` (n, K), balanced over the global batch.

    Rows sum to 1 (each sample's soft assignment); over the global batch each prototype's
    column sums to about B / K (exactly after infinitely many iterations).

    Scores are cosine similarities in [-1, 1] (unit embeddings and prototypes), so
    ``exp(scores / epsilon)`` cannot overflow float32 for epsilon above about 0.012; no
    max is subtracted, because a per-rank shift would scale ranks' columns differently.
    """
    if epsilon <= 0 or iterations < 1:
        raise ValueError(f"need epsilon > 0 and iterations >= 1, got {epsilon}, {iterations}")
    q = torch.exp(scores.detach().float() / epsilon).t()  # K x n, the paper's layout
    k, n = q.shape
    b = n * world_size()  # samples assigned across all ranks

    q /= all_reduce_sum(q.sum())  # the whole matrix sums to 1
    for _ in range(iterations):
        # Each prototype's total weight over the global batch becomes 1/K.
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= k
        # Each sample's total weight becomes 1/B (its column is local to this rank).
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    q *= b  # columns sum to 1: each is a probability over prototypes
    return q.t()


def swapped_prediction_loss(
    scores: Sequence[Tensor],
    codes: Sequence[Tensor],
    crops_for_assign: Sequence[int],
    temperature: float = 0.1,
) -> Tensor:
    """SwAV's loss: predict each assignment crop's code from every other crop.

    Args:
        scores: one (n, K) tensor of prototype scores per crop (global, then local), with
            gradient.
        codes: the (n, K) codes of the crops ``crops_for_assign``, in that order, without
            gradient (from :func:`sinkhorn_knopp`).
        crops_for_assign: indices into ``scores`` of the crops that were given codes.
        temperature: softmax temperature of the predictions.

    For assignment crop i the subloss is the mean over crops v != i of the cross entropy
    ``-mean_rows sum_k q_i log softmax(scores_v / temperature)``; the loss is the mean of
    the sublosses. The rows are this rank's; DDP's gradient averaging makes that the
    global-batch mean.
    """
    if len(scores) < 2:
        raise ValueError(f"swapped prediction needs at least 2 crops, got {len(scores)}")
    if len(codes) != len(crops_for_assign) or not codes:
        raise ValueError("give one code per assignment crop")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # float32 log-softmax: under bf16 autocast the scores arrive in low precision.
    log_p = [F.log_softmax(s.float() / temperature, dim=1) for s in scores]
    loss = scores[0].new_zeros((), dtype=torch.float32)
    for q, crop_id in zip(codes, crops_for_assign, strict=True):
        others = [v for v in range(len(scores)) if v != crop_id]
        subloss = sum(-(q * log_p[v]).sum(dim=1).mean() for v in others)
        loss = loss + subloss / len(others)
    return loss / len(crops_for_assign)
