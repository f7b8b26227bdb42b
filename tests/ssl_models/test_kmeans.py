"""k-means, PCA-whitening and NMI as DeepCluster uses them: blobs recovered exactly, a
non-increasing objective, empty clusters split so none is left, chunked distances equal to
unchunked ones, whitened covariance = identity, and NMI by hand."""

import math

import pytest
import torch

from ssl_models import kmeans as kmeans_module
from ssl_models.kmeans import kmeans, nmi, pca_whiten, preprocess_features


def _blobs(per_blob: int = 40, centres: int = 5, dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = 20 * torch.randn(centres, dim, generator=g)
    truth = torch.arange(centres).repeat_interleave(per_blob)
    return means[truth] + 0.1 * torch.randn(len(truth), dim, generator=g), truth


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_well_separated_blobs_are_recovered_up_to_renaming(seed):
    x, truth = _blobs(seed=seed)
    result = kmeans(x, 5, seed=seed)
    assert nmi(result.assignments, truth) == pytest.approx(1.0)
    for c in range(5):  # each centroid is its blob's mean
        members = x[result.assignments == c]
        torch.testing.assert_close(result.centroids[c], members.mean(0))


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_objective_never_increases_and_matches_the_returned_clustering(init):
    x = torch.randn(500, 4, generator=torch.Generator().manual_seed(3))
    result = kmeans(x, 10, iters=30, init=init, seed=5)
    steps = [*result.history, result.objective]
    assert len(result.history) >= 2
    for before, after in zip(steps, steps[1:], strict=False):
        assert after <= before * (1 + 1e-6)
    direct = (x - result.centroids[result.assignments]).square().sum(1).mean()
    assert result.objective == pytest.approx(direct.item(), rel=1e-5)


def test_same_seed_same_clustering_other_seed_other_init():
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(0))
    a, b, c = kmeans(x, 8, seed=1), kmeans(x, 8, seed=1), kmeans(x, 8, seed=2)
    assert torch.equal(a.assignments, b.assignments)
    assert torch.equal(a.centroids, b.centroids)
    assert not torch.equal(a.assignments, c.assignments)


def test_more_clusters_than_distinct_points_leaves_none_empty():
    # 3 distinct points, each 4 times, into 6 clusters: k-means++ must repeat a point, and
    # the duplicate centroids' clusters start empty (argmin ties go to the first).
    x = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]]).repeat(4, 1)
    result = kmeans(x, 6, seed=0)
    assert result.empty_fixed > 0
    assert torch.bincount(result.assignments, minlength=6).min() >= 1
    assert result.objective == pytest.approx(0.0, abs=1e-6)  # each cluster: one point value
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans(x, 13)


def test_empty_cluster_takes_the_far_side_of_a_split_cluster():
    # Clusters 0 and 1 hold the points; centroid 2 is far from everything, so it is empty.
    x = torch.tensor([[1.0, 1.0], [1.2, 0.8], [0.8, 1.2], [0.9, 0.9], [-9.0, -9.0]])
    labels = torch.tensor([0, 0, 0, 0, 1])
    centroids = torch.tensor([[1.0, 1.0], [-9.0, -9.0], [50.0, 50.0]])
    fixed_labels, fixed = kmeans_module._split_empty(
        x, labels, centroids, torch.Generator().manual_seed(0)
    )
    assert fixed == 1
    # Cluster 1 has one point, so cluster 0 is split, by the sign of (x - c) . (s * c) with
    # s = (+1, -1): (x0 - 1) - (x1 - 1) > 0 only for the second point.
    assert fixed_labels.tolist() == [0, 2, 0, 0, 1]


def test_identical_points_split_in_half():
    x = torch.ones(6, 3)
    labels = torch.zeros(6, dtype=torch.long)
    centroids = torch.stack([torch.ones(3), torch.full((3,), 9.0)])
    fixed_labels, fixed = kmeans_module._split_empty(
        x, labels, centroids, torch.Generator().manual_seed(0)
    )
    assert fixed == 1 and torch.bincount(fixed_labels).tolist() == [3, 3]


def test_chunked_distances_give_the_same_clustering(monkeypatch):
    x = torch.randn(1000, 5, generator=torch.Generator().manual_seed(1))
    whole = kmeans(x, 7, seed=3)
    monkeypatch.setattr(kmeans_module, "_CHUNK_ELEMENTS", 7 * 64)  # 64 rows at a time
    chunked = kmeans(x, 7, seed=3)
    assert torch.equal(whole.assignments, chunked.assignments)
    torch.testing.assert_close(whole.centroids, chunked.centroids)


def test_pca_whitening_gives_identity_covariance_and_unit_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 10, generator=g) @ torch.randn(10, 10, generator=g) + 3.0
    white = pca_whiten(x, 6)
    assert white.shape == (4000, 6)
    cov = white.T @ white / len(white)
    torch.testing.assert_close(cov, torch.eye(6), atol=1e-4, rtol=0)
    torch.testing.assert_close(white.mean(0), torch.zeros(6), atol=1e-4, rtol=0)
    # The kept axes are the top ones: their variance, in x's units, comes first.
    variances = torch.linalg.eigvalsh(torch.cov(x.T, correction=0)).flip(0)
    kept = (x - x.mean(0)).T @ white / len(x)  # = eigenvector * sqrt(eigenvalue) per axis
    torch.testing.assert_close(kept.square().sum(0), variances[:6], rtol=1e-3, atol=1e-4)
    rows = preprocess_features(x, 6).norm(dim=1)
    torch.testing.assert_close(rows, torch.ones(4000))


def test_pca_drops_axes_the_data_does_not_span():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 3, generator=g) @ torch.randn(3, 12, generator=g)  # rank 3
    white = pca_whiten(x, 256)  # asks for more than both D and the rank
    assert white.shape == (500, 3)
    torch.testing.assert_close(white.T @ white / 500, torch.eye(3), atol=1e-3, rtol=0)


def test_nmi_by_hand():
    a = torch.tensor([0, 0, 1, 1, 2, 2])
    assert nmi(a, torch.tensor([5, 5, 3, 3, 9, 9])) == pytest.approx(1.0)  # renamed
    # Independent: every (a, b) pair equally often.
    assert nmi(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])) == pytest.approx(0.0)
    # a = [0 0 1 1], b = [0 0 0 1]: p(a) = (1/2, 1/2), p(b) = (3/4, 1/4),
    # p(a, b) = {(0, 0): 1/2, (1, 0): 1/4, (1, 1): 1/4}.
    mutual = 0.5 * math.log(0.5 / (0.5 * 0.75)) + 0.25 * math.log(0.25 / (0.5 * 0.75))
    mutual += 0.25 * math.log(0.25 / (0.5 * 0.25))
    h_a, h_b = math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    expected = mutual / math.sqrt(h_a * h_b)
    assert nmi(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 0, 1])) == pytest.approx(expected)
    assert nmi(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long)) == 1.0
    assert nmi(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 0, 1])) == 0.0


def test_nmi_of_random_labelings_is_near_zero_and_symmetric():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 10, (20000,), generator=g), torch.randint(0, 10, (20000,), generator=g)
    assert nmi(a, b) < 0.01
    assert nmi(a, b) == pytest.approx(nmi(b, a))
