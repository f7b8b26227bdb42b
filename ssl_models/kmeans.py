"""k-means in torch, as DeepCluster runs it (Caron et al. 2018, arXiv:1807.05520, and the
official ``clustering.py``, which calls faiss): features are PCA-whitened and L2-normalised
(:func:`preprocess_features`), then clustered by Lloyd's algorithm (:func:`kmeans`); the
paper tracks the normalised mutual information between consecutive assignments (:func:`nmi`).

Empty clusters (paper Sec. 3.3, faiss ``split_clusters``): an empty cluster e takes over half
of a non-empty cluster c, picked at random with probability proportional to (size_c - 1)::

    centroid_e, centroid_c = centroid_c * (1 + EPS * s), centroid_c * (1 - EPS * s)
    # s = +1 on even dimensions, -1 on odd ones; EPS = 1/1024 as in faiss
    the points of c go to the nearer of the two

Nearer-of-the-two is a hyperplane through centroid_c with normal s * centroid_c, so the
points are split by the sign of (x - centroid_c) . (s * centroid_c); when that leaves one
side empty (identical points) the half with the larger projection moves. Faiss splits only
the centroids and leaves the points to the next assignment, so its final assignment can
still have empty clusters; splitting the points here, right after each assignment step,
makes every returned cluster non-empty. A split only refines the partition, so the
within-cluster scatter, and with it the objective, never increases.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1 / 1024  # faiss' perturbation: "a bit above machine epsilon for float16"
_CHUNK_ELEMENTS = 1 << 24  # distance-matrix entries per chunk (64 MiB of float32)


@dataclass
class KMeansResult:
    """What :func:`kmeans` found, and how it got there."""

    centroids: Tensor  # (K, D): the mean of each cluster's points
    assignments: Tensor  # (N,) long; every cluster in 0..K-1 has at least one point
    objective: float  # mean squared distance to the assigned centroid (faiss logs the sum)
    history: list[float]  # the objective at each assignment step, non-increasing
    empty_fixed: int  # empty clusters split off others, over all iterations


def pca_whiten(x: Tensor, dim: int, rel_tol: float = 1e-5) -> Tensor:
    """Project centred ``x`` (N, D) onto its top ``dim`` principal axes, each scaled by
    eigenvalue ** -0.5 (faiss ``PCAMatrix(D, dim, eigen_power=-0.5)``), so the output's
    covariance is the identity. Axes with eigenvalue <= ``rel_tol`` * the largest (dead
    units, rank below ``dim``) are dropped rather than amplified: output (N, <= dim)."""
    x = x.float()
    centred = x - x.mean(0)
    # Float64 eigendecomposition: the smallest kept eigenvalues set the whitening scale.
    cov = (centred.T @ centred).double() / x.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0)[:dim], eigenvectors.flip(1)[:, :dim]
    keep = eigenvalues > rel_tol * eigenvalues[0].clamp_min(1e-30)
    projection = eigenvectors[:, keep] * eigenvalues[keep].rsqrt()
    return centred @ projection.to(x.dtype)


def preprocess_features(x: Tensor, pca_dim: int = 256) -> Tensor:
    """DeepCluster's ``preprocess_features``: PCA-whitening to ``pca_dim``, then rows
    L2-normalised."""
    return F.normalize(pca_whiten(x, pca_dim), dim=1)


def _nearest(x: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """(index, squared distance) of each row's nearest centroid, a chunk of rows at a time
    so memory stays O(chunk * K) whatever N is."""
    centroid_sq = centroids.square().sum(1)
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dist = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    rows = max(1, _CHUNK_ELEMENTS // centroids.shape[0])
    for start in range(0, x.shape[0], rows):
        chunk = x[start : start + rows]
        best, index = (centroid_sq - 2 * chunk @ centroids.T).min(1)
        # ||x||^2 + ||c||^2 - 2 x.c can round below zero for coincident points.
        dist[start : start + rows] = (best + chunk.square().sum(1)).clamp_min(0)
        labels[start : start + rows] = index
    return labels, dist


def _means(x: Tensor, labels: Tensor, k: int) -> Tensor:
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    return sums / torch.bincount(labels, minlength=k).clamp_min(1).unsqueeze(1).to(x.dtype)


def _split_empty(
    x: Tensor, labels: Tensor, centroids: Tensor, generator: torch.Generator
) -> tuple[Tensor, int]:
    """Give every empty cluster part of a randomly chosen one (module docstring)."""
    k = centroids.shape[0]
    sizes = torch.bincount(labels, minlength=k).cpu()
    empty = (sizes == 0).nonzero().flatten().tolist()
    if not empty:
        return labels, 0
    labels = labels.clone()
    sign = torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
    sign[1::2] = -1
    for e in empty:
        # Clusters of one point cannot be split; N >= K guarantees a larger one exists.
        c = int(torch.multinomial((sizes - 1).clamp_min(0).double(), 1, generator=generator))
        members = (labels == c).nonzero().flatten()
        centre = centroids[c]
        projection = (x[members] - centre) @ (sign * centre)
        to_e = projection > 0
        if bool(to_e.all()) or not bool(to_e.any()):
            order = torch.argsort(projection, descending=True, stable=True)
            to_e = torch.zeros_like(to_e)
            to_e[order[: len(members) // 2]] = True
        labels[members[to_e]] = e
        sizes[e] = int(to_e.sum())
        sizes[c] -= sizes[e]
    return labels, len(empty)


def _init_centroids(x: Tensor, k: int, init: str, generator: torch.Generator) -> Tensor:
    n = x.shape[0]
    if init == "random":  # faiss: the first k points of a random permutation
        return x[torch.randperm(n, generator=generator)[:k].to(x.device)].clone()
    # k-means++ (Arthur & Vassilvitskii 2007): each next centre is drawn with probability
    # proportional to the squared distance to the nearest centre chosen so far.
    # Squared distances as |x|^2 - 2 x.c + |c|^2: a matrix-vector product per centre, no
    # (N, D) temporary (which made this loop 5x slower than Lloyd's iterations).
    x_sq = x.square().sum(1)

    def sq_dist_to(i: int) -> Tensor:
        return (x_sq - 2 * (x @ x[i]) + x_sq[i]).clamp_min(0)

    chosen = [int(torch.randint(n, (1,), generator=generator))]
    d2 = sq_dist_to(chosen[0])
    for _ in range(1, k):
        cumulative = d2.double().cumsum(0)
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        if cumulative[-1] > 0:  # inverse-CDF draw: stays on x's device, no (N,) transfer
            target = torch.tensor([u * float(cumulative[-1])], dtype=torch.float64)
            pick = int(torch.searchsorted(cumulative, target.to(x.device), side="right"))
            pick = min(pick, n - 1)  # u * total can round up to total
        else:  # fewer distinct points than k: duplicates, later split as empty clusters
            pick = int(u * n)
        chosen.append(pick)
        d2 = torch.minimum(d2, sq_dist_to(pick))
    return x[chosen].clone()


def kmeans(
    x: Tensor, num_clusters: int, *, iters: int = 20, init: str = "kmeans++", seed: int = 0
) -> KMeansResult:
    """Lloyd's k-means on the rows of ``x`` (N, D), with empty clusters split off others.

    ``iters`` assignment steps at most (20: the official code's faiss ``niter``), stopping
    early once an assignment repeats. ``init`` is "kmeans++" or "random" (faiss: random
    points). All randomness comes from a CPU generator seeded with ``seed``, so the same
    ``x`` and ``seed`` give the same clustering on a given device.
    """
    n = x.shape[0]
    if not 1 <= num_clusters <= n:
        raise ValueError(f"num_clusters must be in [1, {n}] (the number of points)")
    if iters < 1 or init not in ("kmeans++", "random"):
        raise ValueError(f"need iters >= 1 and init 'kmeans++' or 'random', got {iters}, {init}")
    x = x.float()
    generator = torch.Generator().manual_seed(seed)
    centroids = _init_centroids(x, num_clusters, init, generator)
    history: list[float] = []
    empty_fixed, previous = 0, None
    for _ in range(iters):
        labels, dist = _nearest(x, centroids)
        history.append(float(dist.double().mean()))
        labels, fixed = _split_empty(x, labels, centroids, generator)
        empty_fixed += fixed
        centroids = _means(x, labels, num_clusters)
        if previous is not None and torch.equal(labels, previous):
            break  # the centroids are those of the last step: a fixed point
        previous = labels
    objective = float((x - centroids[labels]).square().sum(1).double().mean())
    return KMeansResult(centroids, labels, objective, history, empty_fixed)


def nmi(a: Tensor, b: Tensor) -> float:
    """Normalised mutual information I(A; B) / sqrt(H(A) H(B)) of two labelings (N,), the
    paper's definition (Sec. 4.1; sklearn's before 0.22). 1 for identical partitions up to
    renaming, 0 for independent ones; 1 when both are one cluster, 0 when only one is."""
    if a.shape != b.shape or a.ndim != 1 or a.numel() == 0:
        raise ValueError("nmi needs two non-empty labelings of the same length")
    n = a.numel()
    _, a = torch.unique(a, return_inverse=True)
    _, b = torch.unique(b, return_inverse=True)
    count_a, count_b = torch.bincount(a).double(), torch.bincount(b).double()
    # The non-zero cells of the contingency table only: O(N) memory for any K.
    pairs, count_ab = torch.unique(a * len(count_b) + b, return_counts=True)
    p_ab = count_ab.double() / n
    p_a, p_b = count_a / n, count_b / n
    mutual = (p_ab * (p_ab / (p_a[pairs // len(count_b)] * p_b[pairs % len(count_b)])).log()).sum()
    h_a, h_b = -(p_a * p_a.log()).sum(), -(p_b * p_b.log()).sum()
    if h_a == 0 or h_b == 0:
        return float(h_a == h_b)
    return float((mutual / (h_a * h_b).sqrt()).clamp(0, 1))
