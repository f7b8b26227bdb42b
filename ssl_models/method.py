"""The base class every self-supervised method implements.

A method is an ``nn.Module`` with one job: given a batch of views, return the loss and a few
named scalars to log. It owns all of its state (backbone, heads, momentum encoders, queues,
prototypes), so ``state_dict()`` checkpoints everything, and it exposes its backbone for
frozen-feature evaluation.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ssl_models.optim import param_groups


def encode_views(backbone: nn.Module, views: Sequence[Tensor], *heads: nn.Module) -> Tensor:
    """``heads(backbone(view))`` for every view, concatenated in view order.

    Same-size views go through the backbone in one concatenated pass, and each head runs once
    over all views, so batch-norm statistics cover every view (as in the reference
    implementations), not one view at a time. Multi-crop's global and local crops differ in
    size, so they take one backbone pass per run of equal sizes (SwAV's and DINO's
    multi-crop wrapper).
    """
    runs = [list(run) for _, run in groupby(views, key=lambda view: view.shape[-2:])]
    x = torch.cat([backbone(torch.cat(run)) for run in runs])
    for head in heads:
        x = head(x)
    return x


#: A pretext task's data-stage transform: ``make(views, generator) -> {name: tensor}`` (see
#: :meth:`SSLMethod.pretext_views`).
PretextViews = Callable[[list[Tensor], torch.Generator], dict[str, Tensor]]


def split_columns(columns: Mapping[str, Tensor]) -> tuple[list[Tensor], dict[str, Tensor]]:
    """A data-stage output (``SSLMethod.pretext_views``) -> (the ``view_<i>`` columns in index
    order, the ``target_<name>`` columns by name); other columns are left out."""
    views = [columns[f"view_{i}"] for i in range(sum(k.startswith("view_") for k in columns))]
    targets = {k.removeprefix("target_"): v for k, v in columns.items() if k.startswith("target_")}
    return views, targets


@dataclass
class MethodOutput:
    loss: Tensor  # scalar to backpropagate
    logs: dict[str, Tensor]  # detached scalars to log, e.g. {"loss": ..., "pos_sim": ...}


class SSLMethod(nn.Module):
    """Base class: subclasses build their heads and losses and implement :meth:`forward`.

    Subclass ``__init__`` signatures are ``(backbone, feature_dim, *, option=default, ...)``;
    the keyword-only options are what ``method.*`` config keys may set (see ``registry``).
    """

    #: Random full-size ("global") views the data stage makes of each image.
    num_views: ClassVar[int] = 2
    #: Whether ``forward`` also takes multi-crop's small "local" views (Caron et al. 2020):
    #: then the data stage appends ``augment.local_crops`` of them after the global views.
    takes_local_views: ClassVar[bool] = False
    #: The ``model.backbone`` names the method works with (None: any), so a config naming
    #: another is refused before any worker starts (masked image modelling needs a ViT).
    backbones: ClassVar[tuple[str, ...] | None] = None
    #: Whether the step's first backbone call starts with the batch's whole images in batch
    #: order, or never calls the backbone's forward and takes whole images as its first view
    #: (what the online probe reads); tile- and patch-based pretext tasks set False.
    whole_images_first: ClassVar[bool] = True
    #: The image channels the method needs (colorization: 3, it predicts colour from
    #: lightness), so a dataset with others is refused before training; None: any.
    input_channels: ClassVar[int | None] = None
    #: Whether ``forward`` needs each image's dataset index (memory-bank methods); such a
    #: method's ``__init__`` also takes ``num_images`` after ``feature_dim``.
    uses_image_indices: ClassVar[bool] = False

    def __init__(self, backbone: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.steps_per_epoch: int | None = None  # known once the loop calls set_schedule
        self.total_steps: int | None = None

    def forward(self, views: list[Tensor], indices: Tensor | None = None) -> MethodOutput:
        """One training step's loss. ``views`` are normalised float (N, C, H, W) batches;
        ``indices`` are the images' dataset indices, given when ``uses_image_indices``.
        Pretext tasks (:meth:`pretext_views`) also take ``targets``, a dict of tensors.

        The training loop calls the DDP-wrapped module, so all gradient-carrying work must
        happen here for DDP to synchronise it.
        """
        raise NotImplementedError

    @classmethod
    def views_per_image(cls, options: Mapping[str, Any]) -> int:
        """How many global views the data stage draws per image for a run with these method
        ``options``: ``num_views``, unless the options decide it (multi-task)."""
        return cls.num_views

    @classmethod
    def allowed_backbones(cls, options: Mapping[str, Any]) -> tuple[str, ...] | None:
        """The ``model.backbone`` names a run with these method ``options`` works with (None:
        any): ``backbones``, unless the options decide it (multi-task)."""
        return cls.backbones

    @classmethod
    def needed_channels(cls, options: Mapping[str, Any]) -> int | None:
        """The image channels a run with these method ``options`` needs (None: any):
        ``input_channels``, unless the options decide it (multi-task)."""
        return cls.input_channels

    @classmethod
    def pretext_views(cls, options: Mapping[str, Any]) -> PretextViews | None:
        """What the data stage makes of each image's augmented global views for this method.

        ``None`` (the default): the views themselves. A pretext task returns a callable
        ``make(views, generator)`` that maps the batch's ``num_views`` augmented uint8 views
        (N, C, H, W) to a dict of tensors with N rows: ``view_<i>`` uint8 images (shape
        (N, ..., C, h, w): tiles and patches may add a dimension), which the loop normalises
        and passes to ``forward`` as ``views`` in index order, and ``target_<name>``
        tensors (labels, masks), passed as ``targets={name: tensor}``. It runs in the Ray
        Data stage on CPU workers (or on the training device with
        ``augment.on_train_device``), so it is torch code that draws all randomness from
        the generator and pickles. ``options``: the run's method options, defaults filled.
        """
        return None

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimiser parameter groups (frozen teachers are left out: no ``requires_grad``).

        A group with ``"fixed_lr": True`` keeps the base learning rate instead of following
        the warm-up + cosine schedule (SimSiam's predictor).
        """
        return param_groups(self, weight_decay)

    def set_schedule(self, steps_per_epoch: int, total_steps: int) -> None:
        """The loop calls this once before its first step (resumed runs too), so schedules
        counted in epochs (DINO's teacher-temperature warm-up) can be turned into steps."""
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps

    def steps_in(self, epochs: float) -> int:
        """The number of optimiser steps in ``epochs`` epochs of this run."""
        if self.steps_per_epoch is None:
            raise RuntimeError(
                f"{type(self).__name__} counts in epochs: call set_schedule() before training"
            )
        return round(epochs * self.steps_per_epoch)

    def before_optimizer_step(self, step: int) -> None:
        """Hook between ``backward`` and the optimiser step ``step`` (0 for the first):
        gradient clipping, freezing a layer early on. Default: none."""

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Hook the loop calls after each optimiser step (EMA updates etc.). Default: none."""

    def needs_dataset_features(self, step: int) -> bool:
        """Whether the loop must call :meth:`take_dataset_features` before optimiser step
        ``step`` (0 for the first; resumed runs continue the count). Default: never."""
        return False

    def take_dataset_features(
        self, features: Tensor, slots: Tensor, optimizer: torch.optim.Optimizer
    ) -> dict[str, float]:
        """Receive backbone features (N, feature_dim) of every decodable training image,
        computed in eval mode without augmentation, and their dataset ``slots`` (N,) (the
        ``indices`` that ``forward`` receives). Every worker gets the same tensors and calls
        this together, so it may be a collective. Returns scalars for the log.

        Methods that re-cluster the whole dataset (DeepCluster) implement this together
        with :meth:`needs_dataset_features`; ``pipeline.data.dataset_features`` computes them."""
        raise NotImplementedError(f"{type(self).__name__} does not use dataset features")

    def embed_views(self, views: Sequence[Tensor], *heads: nn.Module) -> tuple[Tensor, ...]:
        """``heads(backbone(view))`` for every view (see :func:`encode_views`), split back
        into one tensor per view."""
        return encode_views(self.backbone, views, *heads).chunk(len(views))

    def features(self, images: Tensor) -> Tensor:
        """Backbone features (N, feature_dim) for evaluation."""
        return self.backbone(images)
