"""The base class every self-supervised method implements.

A method is an ``nn.Module`` with one job: given a :class:`Batch` of views, return the loss
and a few named scalars to log. It owns all of its state (backbone, heads, momentum
encoders, queues, prototypes), so ``state_dict()`` checkpoints everything, and it exposes
its backbone for frozen-feature evaluation.

The contract, in three classmethods and one method:

- ``validate(options)``: the options' ranges (``ssl_models.options``), run on the driver by
  the config and again by the registry before building;
- ``requirements(options)``: a :class:`MethodRequirements` saying how many views the data
  stage draws, which backbones and channels suit the method, whether it needs image
  indices, and its pretext transform (``ssl_models.transforms``);
- ``loss(batch)``: the step's loss. The base ``forward(batch)`` checks the batch against the
  declared requirements and calls it, so DDP, which calls ``forward``, sees every gradient
  and no method repeats the checks.
"""

import functools
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ssl_models.heads import through_first_layer
from ssl_models.optim import param_groups
from ssl_models.transforms.pretext import PretextViews


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


@dataclass
class Batch:
    """One training step's input: the normalised float views (N, ...) in the order the
    method declared (global views, then any local views), and, when the method asks for
    them, the images' dataset indices (N,) and the data stage's named targets."""

    views: list[Tensor]
    indices: Tensor | None = None
    targets: dict[str, Tensor] = field(default_factory=dict)

    def target(self, name: str) -> Tensor:
        """The data stage's target ``name``, with an error that says what is missing."""
        if name not in self.targets:
            raise ValueError(f"the batch has no target {name!r} (got {sorted(self.targets)})")
        return self.targets[name]

    def dataset_indices(self) -> Tensor:
        """The images' dataset ``indices``, with an error if the data stage sent none."""
        if self.indices is None:
            raise ValueError("the batch has no dataset indices (the method must declare them)")
        return self.indices


@dataclass
class MethodOutput:
    """What :meth:`SSLMethod.forward` returns: the loss and the scalars to log."""

    loss: Tensor  # scalar to backpropagate
    logs: dict[str, Tensor]  # detached scalars to log, e.g. {"loss": ..., "pos_sim": ...}


@dataclass(frozen=True)
class MethodRequirements:
    """What a method asks of the data stage and the run, for given options."""

    #: Random full-size ("global") views the data stage draws of each image.
    global_views: int = 2
    #: Whether multi-crop's small "local" views (Caron et al. 2020) may follow the global
    #: ones: the data stage appends ``augment.local_crops`` of them.
    local_views: bool = False
    #: The views ``forward`` receives after the pretext transform (None: ``global_views``);
    #: the denoising autoencoder ships a corrupted and a clean view of one global view.
    forward_views: int | None = None
    #: The kinds of backbone the method works with (``backbones.backbone_kind``; None: any),
    #: so a config naming another is refused before any worker starts (masked image
    #: modelling needs a ViT's patch tokens, tile-based tasks a CNN).
    backbone_kinds: tuple[str, ...] | None = None
    #: Whether the step's first backbone call starts with the batch's whole images in batch
    #: order, or never calls the backbone's forward and takes whole images as its first view
    #: (what the online probe reads); tile- and patch-based pretext tasks say False.
    whole_images_first: bool = True
    #: The image channels the method needs (colorization: 3, it predicts colour from
    #: lightness), so a dataset with others is refused before training; None: any.
    input_channels: int | None = None
    #: Whether ``forward`` needs each image's dataset index (memory-bank methods); such a
    #: method's ``__init__`` also takes ``num_images`` after ``feature_dim``.
    image_indices: bool = False
    #: What the data stage makes of each image's global views (``transforms.pretext``);
    #: None: the views themselves.
    pretext: PretextViews | None = None
    #: The paper's per-view recipe: settings that override the augment section's keys, one
    #: mapping per global view, then one for the local views (``transforms.views``'s
    #: ``BYOL_VIEWS``, ``DINO_VIEWS``); None: every view the same (SimCLR, MoCo v2).
    views: tuple[Mapping[str, float], ...] | None = None
    #: Whether the paper normalises over the global batch ("global BN", SyncBN): the
    #: default of ``model.sync_bn`` (``ssl_models.batch_norm.GlobalBatchNorm``).
    global_bn: bool = False

    @property
    def views_in_forward(self) -> int:
        """How many views ``forward`` takes, local views aside."""
        return self.global_views if self.forward_views is None else self.forward_views


class SSLMethod(nn.Module):
    """Base class: subclasses build their heads and losses and implement :meth:`loss`.

    Subclass ``__init__`` signatures are ``(backbone, feature_dim, *, option=default, ...)``;
    the keyword-only options are what ``method.*`` config keys may set (see ``registry``),
    :meth:`validate` checks their ranges and :meth:`requirements` says what the method asks
    of the data stage.

    ``forward(batch)`` checks the batch against the declared requirements (the number of
    views, the image indices) and returns :meth:`loss`. The training loop calls the
    DDP-wrapped module, whose ``forward`` is this one, so all gradient-carrying work happens
    inside ``forward`` and DDP synchronises it; subclasses override ``loss``, never
    ``forward``.
    """

    #: The attribute holding the head whose first hidden layer few-label fine-tuning starts
    #: from (SimCLR v2's protocol, :meth:`finetune_start`); None: the backbone alone.
    finetune_head: ClassVar[str | None] = None

    def __init__(self, backbone: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.steps_per_epoch: int | None = None  # known once the loop calls set_schedule
        self.total_steps: int | None = None

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        """The method's options (keyword-only ``__init__`` parameters) and their defaults."""
        return {
            p.name: p.default
            for p in inspect.signature(cls.__init__).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }

    @classmethod
    def validate(cls, options: Mapping[str, Any]) -> None:
        """Raise ``ssl_models.options.OptionError`` naming the first option out of range.
        ``options``: every option, defaults filled. Default: nothing to check."""

    @classmethod
    def requirements(cls, options: Mapping[str, Any]) -> MethodRequirements:
        """What a run with these method ``options`` (defaults filled) asks of the data stage
        and the run. Default: two global views of whole images, any backbone."""
        return MethodRequirements()

    def declared(self) -> MethodRequirements:
        """The requirements of this method, as ``forward`` checks them: its class's with default
        options (only the views of multi-task depend on options, and it overrides this)."""
        return type(self).requirements(type(self).option_defaults())

    @functools.cached_property
    def _checked_requirements(self) -> MethodRequirements:
        """:meth:`declared`, worked out once rather than on every training step."""
        return self.declared()

    def forward(self, batch: Batch) -> MethodOutput:
        """Check ``batch`` against :meth:`declared`, then return :meth:`loss`."""
        needs = self._checked_requirements
        count, got = needs.views_in_forward, len(batch.views)
        if got != count and not (needs.local_views and got > count):
            views = f"{count} view{'s' * (count != 1)}" + (" (+ local views)" * needs.local_views)
            raise ValueError(f"{type(self).__name__} takes {views}, got {len(batch.views)}")
        if needs.image_indices and batch.indices is None:
            raise ValueError(f"{type(self).__name__} needs the images' dataset indices")
        return self.loss(batch)

    def loss(self, batch: Batch) -> MethodOutput:
        """One training step's loss and logs on a checked ``batch``."""
        raise NotImplementedError

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

    def finetune_start(self) -> tuple[nn.Module, int]:
        """The network few-label fine-tuning copies and puts a classifier on, and its output
        width: the backbone through the first hidden layer of the ``finetune_head`` (SimCLR
        v2 found this beats the backbone alone), or the backbone."""
        if self.finetune_head is None:
            return self.backbone, self.feature_dim
        head = getattr(self, self.finetune_head)
        return through_first_layer(self.backbone, self.feature_dim, head)
