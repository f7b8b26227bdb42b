"""DeepCluster: a zero loss that still reaches every parameter before the first clustering,
assign() = k-means on preprocessed features plus a seeded classifier re-initialisation,
the balanced loss by hand, the reassignment schedule, optimiser reset and checkpoints."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_models import METHODS, build_method
from ssl_models.kmeans import kmeans, preprocess_features
from ssl_models.method import Batch
from ssl_models.methods import DeepCluster
from ssl_models.optim import LARS
from ssl_models.registry import method_params
from tests.ssl_models.distributed import run_on_ranks
from tests.ssl_models.helpers import train_losses


def _deepcluster(num_images: int = 32, **options) -> DeepCluster:
    torch.manual_seed(0)
    options = {"num_clusters": 4, **options}
    return build_method(
        "deepcluster",
        backbone="small_cnn",
        width=0.25,
        in_channels=1,
        num_images=num_images,
        **options,
    )


def _blob_features(n: int = 32, clusters: int = 4, dim: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = 10 * torch.randn(clusters, dim, generator=g)
    return means[torch.arange(n) % clusters] + torch.randn(n, dim, generator=g)


def test_registered_with_its_options_and_needs_num_images():
    assert METHODS["deepcluster"] is DeepCluster
    assert (
        DeepCluster.requirements(DeepCluster.option_defaults()).global_views == 1
        and DeepCluster.requirements(DeepCluster.option_defaults()).image_indices
    )
    assert method_params("deepcluster") == {
        "num_clusters": 100,
        "pca_dim": 256,
        "kmeans_iters": 20,
        "reassign_every_epochs": 1,
        "balance_clusters": True,
        "cluster_seed": 0,
    }
    with pytest.raises(ValueError, match="num_images"):
        build_method("deepcluster", backbone="small_cnn", width=0.25, in_channels=1)
    with pytest.raises(ValueError, match="num_clusters"):
        _deepcluster(num_clusters=1)


def test_classifier_is_never_trust_scaled_and_every_parameter_has_one_group():
    method = _deepcluster()
    groups = method.parameter_groups(1e-5)
    grouped = [p for group in groups for p in group["params"]]
    assert len(grouped) == len(set(grouped)) == len(list(method.parameters()))
    (classifier,) = [g for g in groups if any(p is method.classifier.weight for p in g["params"])]
    assert classifier["exclude_from_lars"] and classifier["weight_decay"] == 1e-5
    assert set(classifier["params"]) == set(method.classifier.parameters())
    # Under LARS the classifier still decays: with a zero gradient, one step moves its weights
    # by exactly -lr * weight_decay * w (plain SGD with decay, no trust ratio).
    optimizer = LARS(method.parameter_groups(0.1), lr=0.5)
    before = method.classifier.weight.detach().clone()
    for p in method.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    moved = before - method.classifier.weight.detach()
    assert torch.allclose(moved, 0.5 * 0.1 * before, rtol=1e-4, atol=1e-9)


def test_before_any_clustering_the_loss_is_zero_but_reaches_every_parameter():
    method = _deepcluster()
    assert (method.pseudo_labels == -1).all()
    out = method(Batch([torch.randn(8, 1, 16, 16)], torch.arange(8)))
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    assert out.logs["labelled_fraction"].item() == 0.0
    assert all(not v.requires_grad for v in out.logs.values())
    out.loss.backward()
    # DDP without find_unused_parameters needs a gradient for every parameter each step.
    for name, p in method.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), name
    with pytest.raises(ValueError, match="indices"):
        method(Batch([torch.randn(8, 1, 16, 16)]))


def test_assign_writes_kmeans_labels_at_the_slots_and_reinitialises_the_classifier():
    method = _deepcluster(num_images=40, cluster_seed=3)
    features = _blob_features()
    slots = torch.randperm(40, generator=torch.Generator().manual_seed(1))[:32]
    before = method.classifier.weight.clone()
    with torch.no_grad():
        method.classifier.bias.fill_(1.0)  # as if trained
    stats = method.assign(features, slots)

    expected = kmeans(preprocess_features(features, 256), 4, iters=20, seed=3 * 1_000_003)
    assert torch.equal(method.pseudo_labels[slots], expected.assignments)
    others = torch.ones(40, dtype=torch.bool)
    others[slots] = False
    assert (method.pseudo_labels[others] == -1).all()
    assert torch.equal(method.cluster_sizes, torch.bincount(expected.assignments, minlength=4))
    assert stats["objective"] == pytest.approx(expected.objective)
    assert stats["empty_fixed"] == expected.empty_fixed
    assert stats["smallest_cluster"] >= 1 and "nmi_previous" not in stats

    weight = method.classifier.weight
    assert not torch.equal(weight, before)
    assert torch.equal(method.classifier.bias, torch.zeros(4))
    assert weight.std().item() == pytest.approx(0.01, rel=0.1)  # the official N(0, 0.01)
    twin = _deepcluster(num_images=40, cluster_seed=3)
    torch.manual_seed(123)  # the global RNG plays no part
    twin.assign(features, slots)
    assert torch.equal(twin.classifier.weight, weight)
    assert torch.equal(twin.pseudo_labels, method.pseudo_labels)


def test_reassignment_reports_nmi_and_draws_a_new_classifier():
    # Whitening all 31 axes 32 points span would make the 28 noise axes as large as the 3
    # that separate the blobs: keep those 3.
    method = _deepcluster(pca_dim=3)
    features, slots = _blob_features(), torch.arange(32)
    method.assign(features, slots)
    first_weight, first_labels = method.classifier.weight.clone(), method.pseudo_labels.clone()
    stats = method.assign(features + 0.01 * torch.randn_like(features), slots)
    assert stats["nmi_previous"] == pytest.approx(1.0)  # the same blobs, maybe renamed
    assert not torch.equal(method.classifier.weight, first_weight)
    assert int(method.assignments_done) == 2
    assert (method.pseudo_labels >= 0).all() and first_labels.shape == (32,)


def test_assign_rejects_bad_slots():
    method = _deepcluster()
    with pytest.raises(ValueError, match="distinct"):
        method.assign(_blob_features(), torch.zeros(32, dtype=torch.long))
    with pytest.raises(ValueError, match="clusters"):
        method.assign(_blob_features(n=3), torch.arange(3))


def test_balanced_loss_by_hand():
    method = _deepcluster(num_images=8)
    with torch.no_grad():
        method.pseudo_labels.copy_(torch.tensor([0, 0, 0, 1, 2, 2, -1, 3]))
        method.cluster_sizes.copy_(torch.tensor([3, 1, 2, 1]))
    images, indices = torch.randn(6, 1, 16, 16), torch.tensor([0, 1, 2, 3, 4, 6])
    loss = method(Batch([images], indices)).loss
    with torch.no_grad():
        logits = method.classifier(method.backbone(images))
    ce = F.cross_entropy(logits[:5], torch.tensor([0, 0, 0, 1, 2]), reduction="none")
    # Weights 1/3, 1/3, 1/3, 1, 1/2 (slot 6 is unlabelled): each cluster's rows count as one
    # cluster's worth, cluster 2 being half present in the batch.
    weights = torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0, 0.5])
    assert loss.item() == pytest.approx(((weights * ce).sum() / weights.sum()).item(), rel=1e-5)

    method.balance_clusters = False
    plain = method(Batch([images], indices)).loss
    assert plain.item() == pytest.approx(ce.mean().item(), rel=1e-5)


def test_training_on_the_pseudo_labels_lowers_the_loss():
    method = _deepcluster(num_images=32)
    images, indices = torch.randn(32, 1, 16, 16), torch.arange(32)
    method.eval()
    with torch.no_grad():
        features = method.backbone(images)
    method.train()
    method.assign(features, indices)
    losses = train_losses(
        method, lambda: [images + 0.1 * torch.randn_like(images)], steps=30, indices=indices
    )
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[0] == pytest.approx(math.log(4), rel=0.05)  # the fresh N(0, 0.01) classifier
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]


@pytest.mark.parametrize(("every", "expected"), [(1, [0, 10, 20, 30, 40]), (2, [0, 20, 40])])
def test_needs_dataset_features_exactly_at_epoch_starts(every, expected):
    method = _deepcluster(reassign_every_epochs=every)
    with pytest.raises(RuntimeError, match="set_schedule"):
        method.needs_dataset_features(0)
    method.set_schedule(10, 50)
    assert [step for step in range(50) if method.needs_dataset_features(step)] == expected


def test_reset_optimizer_state_forgets_only_the_classifier():
    method = _deepcluster()
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9)
    method.assign(_blob_features(), torch.arange(32))
    method(Batch([torch.randn(8, 1, 16, 16)], torch.arange(8))).loss.backward()
    optimizer.step()
    assert all(p in optimizer.state for p in method.parameters())
    method.reset_optimizer_state(optimizer)
    assert all(p not in optimizer.state for p in method.classifier.parameters())
    assert all(p in optimizer.state for p in method.backbone.parameters())
    optimizer.step()  # a fresh start for the classifier, as a new optimiser would make
    assert all(p in optimizer.state for p in method.classifier.parameters())


def test_state_dict_round_trip_keeps_the_clustering():
    method = _deepcluster()
    method.assign(_blob_features(), torch.arange(32))
    copy = _deepcluster()
    copy.load_state_dict(method.state_dict())
    for name in ("pseudo_labels", "cluster_sizes", "assignments_done", "classifier.weight"):
        assert torch.equal(copy.state_dict()[name], method.state_dict()[name]), name
    # The next clustering continues the seed sequence where the original would.
    features = _blob_features(seed=5)
    assert method.assign(features, torch.arange(32)) == copy.assign(features, torch.arange(32))
    assert torch.equal(copy.classifier.weight, method.classifier.weight)


def _ddp_rank(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    method = _deepcluster()
    model = DistributedDataParallel(method)  # find_unused_parameters=False, as in training
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(rank)
    losses = []
    for step in range(4):
        if step == 2:  # rank 1's features differ: rank 0's clustering must win
            method.take_dataset_features(_blob_features(seed=rank), torch.arange(32), optimizer)
        out = model(Batch([torch.randn(8, 1, 16, 16)], torch.arange(8) + 8 * rank))
        optimizer.zero_grad()
        out.loss.backward()  # DDP fails here or in the next forward if a parameter has no grad
        optimizer.step()
        losses.append(out.loss.item())
    own = kmeans(preprocess_features(_blob_features(seed=rank)), 4, seed=0).assignments
    return {
        "losses": losses,
        "labels": method.pseudo_labels,
        "own": own,
        "state": method.state_dict(),
    }


def test_ddp_steps_before_and_after_assign_and_ranks_share_rank0s_clustering(tmp_path):
    first, second = run_on_ranks(_ddp_rank, 2, tmp_path)
    assert first["losses"][:2] == [0.0, 0.0] and first["losses"][2] > 0
    assert torch.equal(first["labels"], second["labels"])
    assert torch.equal(second["labels"], first["own"])
    assert not torch.equal(second["labels"], second["own"])  # rank 1 alone would differ
    # DDP-averaged steps keep the replicas' parameters equal (BN statistics are per rank).
    for key, value in first["state"].items():
        if "running" not in key and "num_batches" not in key:
            assert torch.allclose(value.float(), second["state"][key].float(), atol=1e-6), key
