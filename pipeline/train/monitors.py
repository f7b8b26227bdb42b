"""Online linear probe: a classifier on detached backbone features, trained alongside SSL.

The monitor solo-learn and lightly run during pretraining: every step, the backbone's
features of the first view (taken from the forward pass the method already makes, through a
forward hook, so no method needs to know; methods that never call the backbone's forward,
like masked image modelling, get the first view embedded once more) train a linear head
with its own optimiser on the batch's labels. ``detach`` keeps the probe's gradient out of
the encoder, so the self-supervised training is unchanged. A BatchNorm without affine
parameters in front of the head (as in MAE's linear probe) makes one learning rate work for
every backbone's feature scale. Rows without a label (-1) are skipped; the epoch's accuracy
on the (augmented) training stream is summed over workers, and the head's gradients are
averaged across them, so every worker keeps the same head.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


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
                dist.all_reduce(parameter.grad)
                parameter.grad /= dist.get_world_size()
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
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
