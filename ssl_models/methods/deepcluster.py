"""DeepCluster (Caron et al. 2018, "Deep Clustering for Unsupervised Learning of Visual
Features", arXiv:1807.05520), as in the official facebookresearch/deepcluster ``main.py``:

    for epoch in range(epochs):                      # every `reassign` epochs of training
        with no_grad, model.eval():                  # no augmentation: resize + centre crop
            features = model(all training images)    # top layer removed
        x = l2_normalise(pca_whiten(features, 256))  # clustering.preprocess_features
        labels = kmeans(x, k, niter=20)              # faiss; empty clusters split (Sec. 3.3)
        log nmi(labels, previous labels)             # stability of the assignment
        top_layer = Linear(fd, k); weight ~ N(0, 0.01); bias = 0   # re-created
        optimizer_tl = SGD(top_layer, lr, weight_decay=1e-5)       # a new one, too
        for x, i in sampler uniform over clusters:   # augmented: crop + flip (+ Sobel)
            loss = cross_entropy(top_layer(model(x)), labels[i])
            loss.backward(); optimizer.step(); optimizer_tl.step()

Differences, all deliberate:

- Classifier: AlexNet's two fully connected layers sit between the trunk and the top layer
  and k-means clusters their output; here the backbone (ending in global pooling) is the
  whole trunk, k-means clusters backbone features and the classifier is one linear layer
  on them, so the clustered representation is the one the probes evaluate.
- Uniform sampling over clusters (against a few giant clusters winning) belongs to the data
  stage; the loss instead weights each image by 1 / (its cluster's size), normalised over
  the batch. With uniform image sampling that is the ratio estimate of the cluster-uniform
  loss (1 / K) sum_c mean_{i in c} CE_i, the quantity the uniform sampler's batches
  average (normalised per worker's batch when distributed).
- The classifier stays in the run's one optimiser (the official top layer has its own SGD,
  without momentum): :meth:`DeepCluster.reset_optimizer_state` drops its state, which is
  what the freshly created optimiser has.
- No Sobel filter on the input (the paper's guard against clusters by colour): that is a
  data-stage or backbone choice, left to them.
"""

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models.dist import broadcast_from_rank0
from ssl_models.kmeans import kmeans, nmi, preprocess_features
from ssl_models.method import Batch, MethodOutput, MethodRequirements, SSLMethod
from ssl_models.optim import param_groups
from ssl_models.options import AT_LEAST_ONE, AT_LEAST_TWO, NON_NEGATIVE, check_options
from ssl_models.registry import register


@register("deepcluster")
class DeepCluster(SSLMethod):
    """Classify each image into its cluster from the last k-means on whole-dataset features.

    The training loop re-clusters through the base class's dataset-features hooks: at
    the first step of every ``reassign_every_epochs``-th epoch (``needs_dataset_features``)
    ``pipeline.data.dataset_features`` embeds every training image (eval mode, no augmentation,
    decoded by Ray Data, the same tensors on every worker) and ``take_dataset_features``
    runs :meth:`assign` (a collective when distributed: rank 0's pseudo-labels and
    classifier are broadcast, so the workers agree even if k-means rounds differently on
    them) and :meth:`reset_optimizer_state`. The classifier is re-initialised in place (the
    same ``Parameter`` objects, so the optimiser and DDP keep them), and its momentum must
    not carry over from the previous clustering's classes.

    Until the first ``assign`` every pseudo-label is -1 and the loss is exactly 0, still a
    function of every parameter, so DDP (without ``find_unused_parameters``) gets a (zero)
    gradient for all of them. Images whose slot was not in the last ``assign`` are ignored.

    Args:
        backbone: encoder mapping images to (N, feature_dim) features.
        feature_dim: backbone output dimension.
        num_images: training-set size, one pseudo-label slot per image.
        num_clusters: k. The paper uses 10000 on ImageNet's 1000 classes; its ablation finds
            over-segmentation helps. 100 is the same tenfold over-clustering for 10-class
            datasets and keeps ~600 images per cluster on 60k images.
        pca_dim: PCA-whitening output dimension (256 in the paper; capped by feature_dim).
        kmeans_iters: Lloyd iterations (20: the official faiss ``niter``).
        reassign_every_epochs: epochs of training between clusterings (1, the paper).
        balance_clusters: weight images by inverse cluster size (module docstring), the
            loss-side substitute for the paper's uniform sampling over clusters.
        cluster_seed: seeds k-means and the classifier's re-initialisation; the n-th
            assignment uses a different seed derived from it (the official code draws a
            new faiss seed per epoch), the same on every worker.
    """

    pseudo_labels: Tensor  # buffer (num_images,): cluster per slot, -1 if none
    cluster_sizes: Tensor  # buffer (num_clusters,): images per cluster
    assignments_done: Tensor  # buffer (): clusterings so far

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        num_images: int,
        *,
        num_clusters: int = 100,
        pca_dim: int = 256,
        kmeans_iters: int = 20,
        reassign_every_epochs: int = 1,
        balance_clusters: bool = True,
        cluster_seed: int = 0,
    ) -> None:
        super().__init__(backbone, feature_dim)
        self.num_clusters, self.pca_dim, self.kmeans_iters = num_clusters, pca_dim, kmeans_iters
        self.reassign_every_epochs, self.balance_clusters = reassign_every_epochs, balance_clusters
        self.cluster_seed = cluster_seed
        self.classifier = nn.Linear(feature_dim, num_clusters)
        self.register_buffer("pseudo_labels", torch.full((num_images,), -1, dtype=torch.long))
        self.register_buffer("cluster_sizes", torch.zeros(num_clusters, dtype=torch.long))
        # Counted in the state so a resumed run continues the sequence of seeds.
        self.register_buffer("assignments_done", torch.tensor(0))
        self._reset_classifier()

    def _seed(self, purpose: int) -> int:
        return self.cluster_seed * 1_000_003 + 2 * int(self.assignments_done) + purpose

    @torch.no_grad()
    def _reset_classifier(self) -> None:
        # The official top layer's init; drawn on the CPU so every device gets the same one.
        generator = torch.Generator().manual_seed(self._seed(1))
        weight = torch.randn(self.classifier.weight.shape, generator=generator) * 0.01
        self.classifier.weight.copy_(weight)
        self.classifier.bias.zero_()

    @classmethod
    def validate(cls, options: Mapping[str, Any]) -> None:
        """At least 2 clusters; PCA dimensions, k-means iterations and the re-clustering
        period of at least 1; a non-negative seed."""
        check_options(
            options,
            num_clusters=AT_LEAST_TWO,
            pca_dim=AT_LEAST_ONE,
            kmeans_iters=AT_LEAST_ONE,
            reassign_every_epochs=AT_LEAST_ONE,
            cluster_seed=NON_NEGATIVE,
        )

    @classmethod
    def requirements(cls, options: Mapping[str, Any]) -> MethodRequirements:
        """One view and the images' dataset indices (their pseudo-labels are per image)."""
        return MethodRequirements(global_views=1, image_indices=True)

    def loss(self, batch: Batch) -> MethodOutput:
        """Cross-entropy of the classifier against the images' current pseudo-labels,
        weighted 1 / cluster size with ``balance_clusters`` (for uniform sampling over clusters);
        images not yet clustered weigh 0."""
        views, indices = batch.views, batch.dataset_indices()
        logits = self.classifier(self.backbone(views[0])).float()
        labels = self.pseudo_labels[indices]
        labelled = labels >= 0
        weights = labelled.float()
        if self.balance_clusters:
            weights = weights / self.cluster_sizes[labels.clamp_min(0)].clamp_min(1)
        # Unlabelled rows keep a (zero-weighted) finite loss, so every parameter stays in
        # the graph: DDP then sees a gradient, zero before the first clustering, for all.
        per_image = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")
        loss = (weights * per_image).sum() / weights.sum().clamp_min(1e-12)
        with torch.no_grad():
            correct = (logits.argmax(1) == labels) & labelled
            accuracy = correct.sum() / labelled.sum().clamp_min(1)
        return MethodOutput(
            loss=loss,
            logs={
                "loss": loss.detach(),
                "pseudo_label_accuracy": accuracy.float(),
                "labelled_fraction": labelled.float().mean(),
            },
        )

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """The backbone's usual groups; the classifier steps as under plain SGD even when
        the run uses LARS (the official top layer has its own SGD), since a trust ratio
        would scale its steps by the tiny norm of its fresh N(0, 0.01) weights."""
        classifier = list(self.classifier.parameters())
        groups = param_groups(self.backbone, weight_decay)
        return [
            *groups,
            {"params": classifier, "weight_decay": weight_decay, "exclude_from_lars": True},
        ]

    def needs_dataset_features(self, step: int) -> bool:
        """Re-cluster at the first step of every ``reassign_every_epochs``-th epoch."""
        return step % max(1, self.steps_in(self.reassign_every_epochs)) == 0

    def take_dataset_features(
        self, features: Tensor, slots: Tensor, optimizer: torch.optim.Optimizer
    ) -> dict[str, float]:
        """:meth:`assign` the new clustering, then :meth:`reset_optimizer_state`."""
        stats = self.assign(features, slots)
        self.reset_optimizer_state(optimizer)
        return stats

    @torch.no_grad()
    def assign(self, features: Tensor, slots: Tensor) -> dict[str, float]:
        """Cluster whole-dataset ``features`` (N, feature_dim) of the images at dataset
        ``slots`` (N,), set their pseudo-labels (all other slots: -1) and re-initialise
        the classifier. k-means runs on ``features``' device. Collective when distributed.

        Returns stats: ``objective`` (k-means mean squared distance), ``empty_fixed``
        (empty clusters split off others), ``smallest_cluster``, ``largest_cluster``, and,
        from the second call on, ``nmi_previous`` (NMI with the previous labels of the
        slots labelled both times: how much the clustering still moves)."""
        n = features.shape[0]
        if features.ndim != 2 or slots.shape != (n,):
            raise ValueError(
                f"need features (N, D) and slots (N,), got {features.shape}, {slots.shape}"
            )
        if n < self.num_clusters:
            raise ValueError(f"{n} images cannot fill {self.num_clusters} clusters")
        slots = slots.to(self.pseudo_labels.device, torch.long)
        if slots.min() < 0 or slots.max() >= len(self.pseudo_labels) or len(slots.unique()) < n:
            raise ValueError(f"slots must be distinct and in [0, {len(self.pseudo_labels)})")
        x = preprocess_features(features.detach(), self.pca_dim)
        result = kmeans(x, self.num_clusters, iters=self.kmeans_iters, seed=self._seed(0))
        labels = result.assignments.to(slots.device)
        sizes = torch.bincount(labels, minlength=self.num_clusters)
        stats = {"objective": result.objective, "empty_fixed": float(result.empty_fixed)}
        stats |= {"smallest_cluster": float(sizes.min()), "largest_cluster": float(sizes.max())}
        previous = self.pseudo_labels[slots]
        seen = previous >= 0
        if bool(seen.any()):
            stats["nmi_previous"] = nmi(labels[seen], previous[seen])
        self.pseudo_labels.fill_(-1)
        self.pseudo_labels[slots] = labels
        self.cluster_sizes.copy_(sizes)
        self.assignments_done += 1
        self._reset_classifier()
        broadcast_from_rank0(self.pseudo_labels, self.cluster_sizes, *self.classifier.parameters())
        return stats

    def reset_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Forget ``optimizer``'s state (momentum, Adam moments) for the classifier, as for
        a parameter never stepped: the state of a newly created optimiser."""
        for p in self.classifier.parameters():
            optimizer.state.pop(p, None)
