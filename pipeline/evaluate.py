"""Frozen-feature evaluation: weighted kNN (Wu et al. 2018, arXiv:1805.01978).

Train-split features form the memory bank; each test image takes its k most cosine-similar
bank entries, and each neighbour votes for its label with weight exp(similarity / T). This is
the monitor used by InstDisc, DINO, solo-learn and lightly (k=200, T=0.1 by default).
The two floors next to it say whether the encoder learned anything: kNN on raw pixels, and
kNN on the same architecture with random weights.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.checkpoint import build_method_for, method_from_checkpoint
from pipeline.config import Config
from pipeline.ingest import DecodedImages, ImageSpec, normalize, read_decoded
from ssl_models.method import SSLMethod


def load_labelled(
    shard_dir: str | Path, spec: ImageSpec, limit: int | None = None
) -> DecodedImages:
    """Decode the first ``limit`` images of a shard directory, all of which must be labelled."""
    images = read_decoded(shard_dir, spec, limit)
    unlabelled = int((images.labels < 0).sum())
    if unlabelled:
        raise ValueError(f"{shard_dir}: {unlabelled} images have no label; kNN needs labels")
    return images


@torch.no_grad()
def extract_features(
    encoder: Callable[[Tensor], Tensor],
    pixels: np.ndarray,
    mean: Tensor,
    std: Tensor,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Features of uint8 images in batches, L2-normalised, on the CPU."""
    out = []
    for start in range(0, len(pixels), batch_size):
        batch = torch.from_numpy(pixels[start : start + batch_size]).to(device)
        out.append(
            F.normalize(
                encoder(normalize(batch, mean.to(device), std.to(device))).float(), dim=1
            ).cpu()
        )
    return torch.cat(out)


@torch.no_grad()
def knn_predict(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk: int = 1024,
) -> Tensor:
    """Class scores (Q, num_classes) from similarity-weighted votes of the k nearest bank rows.

    ``bank`` and ``queries`` must be L2-normalised, so the dot product is cosine similarity.
    """
    k = min(k, len(bank))
    scores = []
    for start in range(0, len(queries), chunk):
        sim = queries[start : start + chunk] @ bank.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(len(top_sim), num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, bank_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def topk_accuracy(scores: Tensor, labels: Tensor, k: int) -> float:
    k = min(k, scores.shape[1])
    hits = (scores.topk(k, dim=1).indices == labels.view(-1, 1)).any(1)
    return hits.float().mean().item()


def knn_accuracy(
    bank: Tensor, bank_labels: Tensor, queries: Tensor, labels: Tensor, k: int, temperature: float
) -> dict[str, float]:
    """kNN top-1 and top-5 accuracy of ``queries`` against the labelled ``bank``."""
    num_classes = int(max(bank_labels.max(), labels.max())) + 1
    scores = knn_predict(bank, bank_labels, queries, num_classes, k, temperature)
    return {"top1": topk_accuracy(scores, labels, 1), "top5": topk_accuracy(scores, labels, 5)}


def raw_pixel_features(pixels: np.ndarray) -> Tensor:
    """The raw-pixel floor's features: flattened, L2-normalised images."""
    return F.normalize(torch.from_numpy(pixels).flatten(1).float(), dim=1)


@dataclass
class KNNRow:
    """One line of the evaluation table; ``spread`` is the queries' feature_spread."""

    name: str
    top1: float
    top5: float
    spread: float


@dataclass
class KNNReport:
    """The kNN protocol's settings and one row per feature set."""

    rows: list[KNNRow]
    k: int
    temperature: float
    queries: str

    def table(self) -> str:
        """The evaluation table printed by ``evaluate`` and ``demo``."""
        width = max(len(r.name) for r in self.rows)
        lines = [
            f"kNN (k={self.k}, cosine, T={self.temperature:g}) on {self.queries}",
            f"{'features':<{width}}  top-1   top-5   spread",
            f"{'-' * width}  ------  ------  ------",
        ]
        lines += [
            f"{r.name:<{width}}  {r.top1:.4f}  {r.top5:.4f}  {r.spread:.3f}" for r in self.rows
        ]
        return "\n".join(lines)


@dataclass
class EvalContext:
    """A checkpoint's frozen method and the labelled splits it is judged on, loaded once.

    ``train`` is the kNN bank / probe training split and ``test`` the queries: by default the
    run's data.eval_train and data.eval_test; other shard directories give transfer to
    another dataset, decoded to the checkpoint's image size and channels.
    """

    method: SSLMethod
    config: Config
    state: dict[str, Any]
    train: DecodedImages
    test: DecodedImages
    test_name: str
    _features: dict[tuple[int, int], Tensor] = field(default_factory=dict, repr=False)

    @property
    def spec(self) -> ImageSpec:
        return ImageSpec(size=self.state["image_size"], channels=self.state["channels"])

    @property
    def mean_std(self) -> tuple[Tensor, Tensor]:
        return torch.tensor(self.state["mean"]), torch.tensor(self.state["std"])

    @property
    def num_classes(self) -> int:
        return int(max(self.train.labels.max(), self.test.labels.max())) + 1

    def features(self, method: SSLMethod, images: DecodedImages) -> Tensor:
        """``method``'s frozen features of one split, extracted once per context (the
        protocols share them)."""
        key = (id(method), id(images))
        if key not in self._features:
            mean, std = self.mean_std
            self._features[key] = extract_features(
                method.eval().features, images.pixels, mean, std, self.config.eval.batch_size
            )
        return self._features[key]

    @functools.cached_property
    def untrained(self) -> SSLMethod:
        """The same architecture with the run's seed and random weights: the floor."""
        torch.manual_seed(self.config.run.seed)
        method = build_method_for(self.config, self.spec.channels, self.state.get("num_images"))
        return method.eval()

    def label(self) -> str:
        model = self.config.model
        return f"{self.config.method_name} {model.backbone} w{model.width:g}"


def load_eval_context(
    path: str | Path, train_dir: str | Path | None = None, test_dir: str | Path | None = None
) -> EvalContext:
    """Load a checkpoint and decode its labelled evaluation splits (or the given ones)."""
    method, config, state = method_from_checkpoint(path)
    spec = ImageSpec(size=state["image_size"], channels=state["channels"])
    test_dir = test_dir or config.data.eval_test
    train = load_labelled(train_dir or config.data.eval_train, spec)
    return EvalContext(method, config, state, train, load_labelled(test_dir, spec), str(test_dir))


def evaluate_checkpoint(
    path: str | Path | EvalContext,
    *,
    floors: bool = False,
    k: int | None = None,
    temperature: float | None = None,
) -> KNNReport:
    """kNN top-1/top-5 of a checkpoint's frozen backbone on its config's eval splits.

    With ``floors``, also the raw-pixel floor and the random-init floor (same architecture,
    untrained weights, same normalisation), which a useful encoder must beat.
    """
    context = path if isinstance(path, EvalContext) else load_eval_context(path)
    k = k or context.config.eval.knn_k
    temperature = temperature or context.config.eval.knn_temperature
    bank_labels = torch.from_numpy(context.train.labels)
    query_labels = torch.from_numpy(context.test.labels)

    def score(name: str, bank_features: Tensor, query_features: Tensor) -> KNNRow:
        acc = knn_accuracy(bank_features, bank_labels, query_features, query_labels, k, temperature)
        return KNNRow(name, acc["top1"], acc["top5"], feature_spread(query_features))

    def encoder_row(name: str, method: SSLMethod) -> KNNRow:
        return score(
            name, context.features(method, context.train), context.features(method, context.test)
        )

    model = context.config.model
    rows = [encoder_row(f"SSL {context.label()}, epoch {context.state['epoch']}", context.method)]
    if floors:
        raw = raw_pixel_features
        rows.append(score("raw pixels", raw(context.train.pixels), raw(context.test.pixels)))
        rows.append(
            encoder_row(f"random-init {model.backbone} w{model.width:g}", context.untrained)
        )
    return KNNReport(rows, k, temperature, context.test_name)


def feature_spread(features: Tensor) -> float:
    """How far apart L2-normalised features are: mean per-dimension std times sqrt(D).

    About 1 for directions spread over the sphere, lower for features confined to a cone
    (e.g. after a ReLU), and 0 when every image maps to the same embedding (collapse).
    """
    normalised = F.normalize(features.float(), dim=1)
    return (normalised.std(dim=0).mean() * normalised.shape[1] ** 0.5).item()
