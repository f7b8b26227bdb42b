"""Multi-task self-supervision (Doersch & Zisserman 2017, "Multi-task Self-Supervised Visual
Learning", arXiv:1708.07860): several self-supervised tasks train one shared trunk, each
through its own head, and the loss is their weighted sum.

    for x in loader:
        views_t, targets_t = pretext_t(augment_t(x))       # each task, in the data stage
        loss = sum_t  w_t * loss_t(head_t(trunk(views_t)), targets_t)

Each task is a registered method built on the *same* backbone object: its heads are its own,
the trunk is shared. The data stage draws the tasks' global views one after another and runs
each task's own transform on its share. The paper trains the tasks asynchronously on
separate workers and also tries a lasso over the trunk's layers and input harmonisation
(every task sees grayscale); here each step computes every task's loss on the same images,
the plain combination the paper starts from, with configurable weights (equal by default).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ssl_models.method import MethodOutput, PretextViews, SSLMethod, split_columns
from ssl_models.optim import param_groups

_SEP = "__"  # target_<task>__<name>: the task a shipped target belongs to
_COUNTS = "views_per_task"  # target: how many view columns each task shipped


def _task_classes(tasks: Sequence[str]) -> list[type[SSLMethod]]:
    from ssl_models.registry import METHODS  # imported here: the registry imports this module

    if isinstance(tasks, str) or not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be a list of distinct method names, got {tasks!r}")
    allowed = sorted(name for name, cls in METHODS.items() if cls is not MultiTask)
    unknown = [task for task in tasks if task not in allowed]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; choose from {allowed}")
    return [METHODS[task] for task in tasks]


def _task_options(options: Mapping[str, Any], task: str) -> dict[str, Any]:
    """Task ``task``'s options: its defaults, then what ``task_options`` sets for it."""
    from ssl_models.registry import method_params

    return method_params(task) | dict((options.get("task_options") or {}).get(task, {}))


@dataclass(frozen=True)
class TaskViews:
    """Data stage: split the global views among the tasks, run each task's transform, and
    number the views and name the targets so that ``forward`` can split them again."""

    tasks: tuple[str, ...]
    views_per_task: tuple[int, ...]
    transforms: tuple[PretextViews | None, ...]

    def __call__(self, views: list[Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        shipped: list[int] = []
        start = 0
        for task, count, transform in zip(
            self.tasks, self.views_per_task, self.transforms, strict=True
        ):
            mine = views[start : start + count]
            start += count
            own, targets = (
                split_columns(transform(mine, generator)) if transform is not None else (mine, {})
            )
            for index, view in enumerate(own, start=sum(shipped)):
                out[f"view_{index}"] = view
            for name, value in targets.items():
                out[f"target_{task}{_SEP}{name}"] = value
            shipped.append(len(own))
        counts = torch.tensor(shipped, device=views[0].device)
        out[f"target_{_COUNTS}"] = counts.expand(len(views[0]), -1).contiguous()
        return out


class MultiTask(SSLMethod):
    """Several registered methods on one shared backbone; loss = sum of weighted losses.

    Args:
        backbone: the shared trunk.
        feature_dim: its output dimension.
        num_images: training-set size, for tasks that keep per-image state (Exemplar, PIRL).
        tasks: method names, e.g. ``[rotation, relative_patch]``.
        weights: one loss weight per task (default: 1 each).
        task_options: per task, its ``method.*`` options, e.g. ``{jigsaw: {num_permutations:
            100}}``; unset options take the task's defaults.
    """

    # Indices are passed whether or not a task uses them, so any task can join.
    uses_image_indices: ClassVar[bool] = True
    whole_images_first: ClassVar[bool] = False  # which task's input comes first varies

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        num_images: int,
        *,
        tasks: Sequence[str] = ("rotation", "relative_patch"),
        weights: Sequence[float] | None = None,
        task_options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__(backbone, feature_dim)
        classes = _task_classes(tasks)
        weights = [1.0] * len(tasks) if weights is None else [float(w) for w in weights]
        if len(weights) != len(tasks) or any(w < 0 for w in weights):
            raise ValueError(f"weights must be {len(tasks)} numbers >= 0, got {weights}")
        task_options = dict(task_options or {})
        if set(task_options) - set(tasks):
            raise ValueError(f"task_options names tasks not in {list(tasks)}: {task_options}")
        self.weights = weights
        self._wanting_features: list[str] = []
        self.tasks = nn.ModuleDict()
        for name, cls in zip(tasks, classes, strict=True):
            options = dict(task_options.get(name, {}))
            extra = (num_images,) if cls.uses_image_indices else ()
            self.tasks[name] = cls(backbone, feature_dim, *extra, **options)

    @classmethod
    def views_per_image(cls, options: Mapping[str, Any]) -> int:
        return sum(task.num_views for task in _task_classes(options["tasks"]))

    @classmethod
    def allowed_backbones(cls, options: Mapping[str, Any]) -> tuple[str, ...] | None:
        """The backbones every task works with (None: any); empty if none suits them all."""
        allowed = None
        for task in _task_classes(options["tasks"]):
            if task.backbones is not None:
                known = task.backbones if allowed is None else allowed
                allowed = tuple(b for b in known if b in task.backbones)
        return allowed

    @classmethod
    def needed_channels(cls, options: Mapping[str, Any]) -> int | None:
        needs = {task.input_channels for task in _task_classes(options["tasks"])} - {None}
        if len(needs) > 1:
            raise ValueError(f"tasks {list(options['tasks'])} need different channels {needs}")
        return next(iter(needs), None)

    @classmethod
    def pretext_views(cls, options: Mapping[str, Any]) -> PretextViews:
        tasks = tuple(options["tasks"])
        classes = _task_classes(tasks)
        return TaskViews(
            tasks,
            tuple(task.num_views for task in classes),
            tuple(
                task.pretext_views(_task_options(options, name))
                for name, task in zip(tasks, classes, strict=True)
            ),
        )

    def forward(
        self,
        views: list[Tensor],
        indices: Tensor | None = None,
        targets: dict[str, Tensor] | None = None,
    ) -> MethodOutput:
        targets = dict(targets or {})
        if _COUNTS not in targets:
            raise ValueError("MultiTask needs the views its data-stage transform made")
        counts = targets.pop(_COUNTS)[0].tolist()
        loss, logs, start = 0.0, {}, 0
        for (name, task), weight, count in zip(
            self.tasks.items(), self.weights, counts, strict=True
        ):
            prefix = f"{name}{_SEP}"
            own = {k.removeprefix(prefix): v for k, v in targets.items() if k.startswith(prefix)}
            extra: dict[str, Any] = {"targets": own} if own else {}
            if task.uses_image_indices:
                extra["indices"] = indices
            output = task(views[start : start + count], **extra)
            start += count
            loss = loss + weight * output.loss
            logs |= {f"{name}/{key}": value for key, value in output.logs.items()}
        return MethodOutput(loss=loss, logs={"loss": loss.detach(), **logs})

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """The backbone's groups once, then each task's own groups without the backbone
        (so a task's special groups, e.g. a fixed learning rate, are kept)."""
        shared = {id(p) for p in self.backbone.parameters()}
        groups = param_groups(self.backbone, weight_decay)
        for task in self.tasks.values():
            for group in task.parameter_groups(weight_decay):
                own = [p for p in group["params"] if id(p) not in shared]
                if own:
                    groups.append({**group, "params": own})
        return groups

    def set_schedule(self, steps_per_epoch: int, total_steps: int) -> None:
        super().set_schedule(steps_per_epoch, total_steps)
        for task in self.tasks.values():
            task.set_schedule(steps_per_epoch, total_steps)

    def before_optimizer_step(self, step: int) -> None:
        for task in self.tasks.values():
            task.before_optimizer_step(step)

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        for task in self.tasks.values():
            task.after_optimizer_step(step, total_steps)

    def needs_dataset_features(self, step: int) -> bool:
        # Remembered for take_dataset_features, which the loop calls right after.
        self._wanting_features = [
            name for name, task in self.tasks.items() if task.needs_dataset_features(step)
        ]
        return bool(self._wanting_features)

    def take_dataset_features(
        self, features: Tensor, slots: Tensor, optimizer: torch.optim.Optimizer
    ) -> dict[str, float]:
        stats: dict[str, float] = {}
        for name in self._wanting_features:
            for key, value in (
                self.tasks[name].take_dataset_features(features, slots, optimizer).items()
            ):
                stats[f"{name}/{key}"] = value
        return stats
