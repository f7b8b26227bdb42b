"""What the training loop watches besides its loss: the progress log, the online kNN
monitor and the online linear probe.

Progress: :class:`EpochScalars` summarises each epoch's per-step scalars (mean, first and
last steps) and :class:`ProgressLog` writes rank 0's console line.

Online kNN (:class:`OnlineKNN`): once per epoch on rank 0, a kNN classifier over a bank of
labelled training images scores disjoint training queries.

Online linear probe (:class:`OnlineProbe`): a classifier on detached backbone features,
trained alongside SSL, as solo-learn and lightly run it during pretraining: every step, the
backbone's features of the first view (taken from the forward pass the method already makes,
through a forward hook, so no method needs to know; methods that never call the backbone's forward,
like masked image modelling, get the first view embedded once more) train a linear head
with its own optimiser on the batch's labels. ``detach`` keeps the probe's gradient out of
the encoder, so the self-supervised training is unchanged. A BatchNorm without affine
parameters in front of the head (as in MAE's linear probe) makes one learning rate work for
every backbone's feature scale. Rows without a label (-1) are skipped; the epoch's accuracy
on the (augmented) training stream is summed over workers, and the head's gradients are
averaged across them, so every worker keeps the same head.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import Config
from pipeline.data.image_features import extract_features
from pipeline.data.ingest import ImageSpec, load_labelled
from ssl_models.knn import knn_accuracy

EDGE_STEPS = 5  # steps averaged for the per-epoch <name>_first_steps / <name>_last_steps


class EpochScalars:
    """Scalars logged every step, summarised per epoch: the mean, and the means of the
    first and last ``EDGE_STEPS`` steps (is it still learning?). Values stay tensors on
    the training device until :meth:`summary`, so recording them costs no synchronisation."""

    def __init__(self) -> None:
        self.steps = 0
        self.sums: dict[str, Any] = {}
        self.first: dict[str, list[torch.Tensor]] = {}
        self.last: dict[str, list[torch.Tensor]] = {}

    def add(self, values: dict[str, torch.Tensor]) -> None:
        """Record one step's scalars (detached, still on their device)."""
        self.steps += 1
        for name, value in values.items():
            value = value.detach().float()
            self.sums[name] = self.sums.get(name, 0.0) + value
            if self.steps <= EDGE_STEPS:
                self.first.setdefault(name, []).append(value)
            self.last[name] = [*self.last.get(name, [])[-(EDGE_STEPS - 1) :], value]

    def summary(self, prefix: str = "") -> dict[str, float]:
        """{prefix+name: epoch mean, ..._first_steps, ..._last_steps} for every name."""
        out = {}
        for name, total in self.sums.items():
            out[f"{prefix}{name}"] = float(total) / self.steps
            for edge, values in (("first", self.first[name]), ("last", self.last[name])):
                out[f"{prefix}{name}_{edge}_steps"] = float(sum(values)) / len(values)
        return out


class ProgressLog:
    """One console line per interval from rank 0: epoch, step, loss, images/s and ETA.

    Rate and ETA come from the latest interval only, so start-up and the pauses for
    checkpoints and the kNN monitor do not distort them.
    """

    def __init__(self, first_step: int, total_steps: int, global_batch: int) -> None:
        self.total_steps, self.global_batch = total_steps, global_batch
        self.mark(first_step)

    def mark(self, step: int) -> None:
        """Start a new interval (also at each epoch start)."""
        self.last, self.last_step = time.perf_counter(), step

    def images_per_second(self, step: int) -> float:
        """Global images/s since the last mark; starts the next interval."""
        now = time.perf_counter()
        rate = (step - self.last_step) * self.global_batch / max(now - self.last, 1e-9)
        self.last, self.last_step = now, step
        return rate

    def line(self, epoch: int, epochs: int, step: int, loss: float, lr: float, rate: float) -> str:
        """The console line for ``step``, with the ETA that ``rate`` (images/s) implies."""
        eta = int((self.total_steps - step) * self.global_batch / max(rate, 1e-9))
        return (
            f"epoch {epoch + 1}/{epochs}  step {step}/{self.total_steps}  loss {loss:.4f}  "
            f"lr {lr:.4f}  {rate:,.0f} img/s  ETA {eta // 60}m{eta % 60:02d}s"
        )


class OnlineKNN:
    """Per-epoch kNN monitor on rank 0: a bank and disjoint queries from the labelled train
    split (never the test set), so sweeps can select on it without touching test data."""

    def __init__(self, config: Config, spec: ImageSpec) -> None:
        bank = config.train.online_knn_bank
        images = load_labelled(config.data.eval_train, spec, bank + config.train.online_knn_queries)
        self.bank_pixels, self.query_pixels = images.pixels[:bank], images.pixels[bank:]
        self.bank_labels = torch.from_numpy(images.labels[:bank])
        self.query_labels = torch.from_numpy(images.labels[bank:])
        self.k, self.temperature = config.train.online_knn_k, config.eval.knn_temperature

    def __call__(
        self, encoder: Callable[[Tensor], Tensor], mean: Tensor, std: Tensor, device: torch.device
    ) -> float:
        """Top-1 of the queries against the bank, both embedded by ``encoder`` now."""
        bank = extract_features(encoder, self.bank_pixels, mean, std, device=device)
        queries = extract_features(encoder, self.query_pixels, mean, std, device=device)
        acc = knn_accuracy(
            bank, self.bank_labels, queries, self.query_labels, self.k, self.temperature
        )
        return acc["top1"]


class OnlineProbe:
    """Linear head on ``backbone``'s output for the first ``len(labels)`` rows of a step."""

    def __init__(
        self, backbone: nn.Module, feature_dim: int, num_classes: int, lr: float = 0.1
    ) -> None:
        device = next(backbone.parameters()).device
        self.backbone = backbone
        self.head = nn.Sequential(
            nn.BatchNorm1d(feature_dim, affine=False), nn.Linear(feature_dim, num_classes)
        ).to(device)
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr=lr, momentum=0.9)
        self.armed = False
        self.features: Tensor | None = None
        self.correct = torch.zeros((), device=device)
        self.seen = torch.zeros((), device=device)
        backbone.register_forward_hook(self._capture)

    def arm(self) -> None:
        """Capture the next backbone call: call before the training step's forward."""
        self.armed, self.features = True, None

    def _capture(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        # The step's first backbone call: every method passes the first view first (alone,
        # or first in a concatenation of the views). Evaluation calls are not armed.
        if self.armed:
            self.armed, self.features = False, output.detach()

    def step(self, labels: Tensor, images: Tensor | None = None) -> None:
        """Train the head on the captured features of this step's labelled rows.

        ``images`` (the step's first view) are embedded here, without gradient, when the
        method never called the backbone's forward: masked image modelling runs the encoder
        on token subsets, and the probe wants the whole image's features.
        """
        features, self.features = self.features, None
        if features is None and images is not None:
            self.armed = False
            with torch.no_grad():
                features = self.backbone(images)
        if features is None:
            raise RuntimeError("the backbone did not run in this step")
        known = labels >= 0
        self.head.train()
        logits = self.head(features[: len(labels)].float())
        # Every worker steps, labelled rows or not, so the gradient all-reduce always matches.
        losses = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
        loss = (losses * known).sum() / known.sum().clamp(min=1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for parameter in self.head.parameters():  # gloo has no AVG: sum, then divide
                grad = parameter.grad  # every head parameter has one after the backward
                if grad is not None:
                    dist.all_reduce(grad)
                    grad /= dist.get_world_size()
        self.optimizer.step()
        self.correct += ((logits.argmax(1) == labels) & known).sum()
        self.seen += known.sum()

    def epoch_accuracy(self) -> float | None:
        """Top-1 over every worker's labelled rows since the last call; None if none."""
        counts = torch.stack([self.correct, self.seen]).float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        self.correct.zero_()
        self.seen.zero_()
        return None if counts[1] == 0 else (counts[0] / counts[1]).item()

    def state_dict(self) -> dict[str, Any]:
        """The head's and its optimiser's state, for the run's checkpoint."""
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
