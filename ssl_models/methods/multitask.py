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

import functools
import operator
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from ssl_models.method import Batch, MethodOutput, MethodRequirements, SSLMethod
from ssl_models.optim import param_groups
from ssl_models.options import OptionError, require
from ssl_models.registry import METHODS, method_params, register
from ssl_models.transforms.multitask import TASK_SEPARATOR, VIEW_COUNTS, TaskViews


def _task_classes(tasks: Sequence[str]) -> list[type[SSLMethod]]:
    require(
        not isinstance(tasks, str) and bool(tasks) and len(set(tasks)) == len(tasks),
        "tasks",
        f"must be a list of distinct method names, got {tasks!r}",
    )
    allowed = sorted(name for name, cls in METHODS.items() if cls is not MultiTask)
    unknown = [task for task in tasks if task not in allowed]
    require(not unknown, "tasks", f"names unknown tasks {unknown}; choose from {allowed}")
    return [METHODS[task] for task in tasks]


def _task_options(options: Mapping[str, Any], task: str) -> dict[str, Any]:
    """Task ``task``'s options: its defaults, then what ``task_options`` sets for it."""
    return method_params(task) | dict((options["task_options"] or {}).get(task, {}))


def _common_backbones(needs: list[MethodRequirements]) -> tuple[str, ...] | None:
    """The backbone kinds every task works with (None: any); empty if none suits them all."""
    allowed = None
    for need in needs:
        if need.backbone_kinds is not None:
            known = need.backbone_kinds if allowed is None else allowed
            allowed = tuple(b for b in known if b in need.backbone_kinds)
    return allowed


@register("multitask")
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
        self.options = {"tasks": tuple(tasks), "weights": weights, "task_options": task_options}
        self.weights = [1.0] * len(tasks) if weights is None else [float(w) for w in weights]
        self._wanting_features: list[str] = []
        self.tasks = nn.ModuleDict()
        for name, cls in zip(tasks, _task_classes(tasks), strict=True):
            needs = cls.requirements(_task_options(self.options, name))
            extra = (num_images,) if needs.image_indices else ()
            options = dict((task_options or {}).get(name, {}))
            self.tasks[name] = cls(backbone, feature_dim, *extra, **options)

    @classmethod
    def validate(cls, options: Mapping[str, Any]) -> None:
        """Known, distinct tasks; one weight >= 0 per task if any; ``task_options`` naming
        only those tasks and their options, each task's options valid; a backbone that suits
        every task."""
        tasks, weights = options["tasks"], options["weights"]
        classes = _task_classes(tasks)
        if weights is not None:
            require(
                isinstance(weights, list | tuple)
                and len(weights) == len(tasks)
                and all(isinstance(w, int | float) and w >= 0 for w in weights),
                "weights",
                f"must be {len(tasks)} numbers >= 0, got {weights!r}",
            )
        given = options["task_options"] or {}
        require(
            isinstance(given, Mapping) and set(given) <= set(tasks),
            "task_options",
            f"must map tasks in {list(tasks)} to their options, got {given!r}",
        )
        for name, task in zip(tasks, classes, strict=True):
            unknown = set(given.get(name, {})) - set(method_params(name))
            require(not unknown, "task_options", f"names unknown {name} options {unknown}")
            try:
                task.validate(_task_options(options, name))
            except OptionError as error:
                raise OptionError("task_options", f"{name}.{error}") from None
        backbones = _common_backbones(
            [
                task.requirements(_task_options(options, name))
                for name, task in zip(tasks, classes, strict=True)
            ]
        )
        require(
            backbones != (),
            "tasks",
            "is refused: its tasks need different backbones (no model.backbone suits them all)",
        )

    @classmethod
    def requirements(cls, options: Mapping[str, Any]) -> MethodRequirements:
        """The tasks' views one task after another, their transforms run on each task's
        share, the backbones and channels they all accept; dataset indices always."""
        tasks = tuple(options["tasks"])
        needs = [
            task.requirements(_task_options(options, name))
            for name, task in zip(tasks, _task_classes(tasks), strict=True)
        ]
        channels = {need.input_channels for need in needs} - {None}
        require(len(channels) <= 1, "tasks", f"need different image channels {channels}")
        return MethodRequirements(
            global_views=sum(need.global_views for need in needs),
            forward_views=sum(need.views_in_forward for need in needs),
            backbone_kinds=_common_backbones(needs),
            whole_images_first=False,  # which task's input comes first varies
            input_channels=next(iter(channels), None),
            # Indices are passed whether or not a task uses them, so any task can join.
            image_indices=True,
            pretext=TaskViews(
                tasks,
                tuple(need.global_views for need in needs),
                tuple(need.pretext for need in needs),
            ),
        )

    def declared(self) -> MethodRequirements:
        """The requirements of this instance's tasks."""
        return self.requirements(self.options)

    def task_methods(self) -> dict[str, SSLMethod]:
        """The task methods by name, in task order (``tasks`` holds only these)."""
        return {name: cast(SSLMethod, task) for name, task in self.tasks.items()}

    def loss(self, batch: Batch) -> MethodOutput:
        """The weighted sum of the tasks' losses, each on its own share of the views and
        targets; each task's logs under ``<task>/``."""
        counts = batch.target(VIEW_COUNTS)[0].tolist()
        weighted: list[Tensor] = []
        logs: dict[str, Tensor] = {}
        start = 0
        for (name, task), weight, count in zip(
            self.task_methods().items(), self.weights, counts, strict=True
        ):
            prefix = f"{name}{TASK_SEPARATOR}"
            own = {
                k.removeprefix(prefix): v for k, v in batch.targets.items() if k.startswith(prefix)
            }
            output = task(Batch(batch.views[start : start + count], batch.indices, own))
            start += count
            weighted.append(weight * output.loss)
            logs |= {f"{name}/{key}": value for key, value in output.logs.items()}
        loss = functools.reduce(operator.add, weighted)  # summed in task order
        return MethodOutput(loss=loss, logs={"loss": loss.detach(), **logs})

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """The backbone's groups once, then each task's own groups without the backbone
        (so a task's special groups, e.g. a fixed learning rate, are kept)."""
        shared = {id(p) for p in self.backbone.parameters()}
        groups = param_groups(self.backbone, weight_decay)
        for task in self.task_methods().values():
            for group in task.parameter_groups(weight_decay):
                own = [p for p in group["params"] if id(p) not in shared]
                if own:
                    groups.append({**group, "params": own})
        return groups

    def set_schedule(self, steps_per_epoch: int, total_steps: int) -> None:
        """Tell every task the schedule as well."""
        super().set_schedule(steps_per_epoch, total_steps)
        for task in self.task_methods().values():
            task.set_schedule(steps_per_epoch, total_steps)

    def before_optimizer_step(self, step: int) -> None:
        """Every task's ``before_optimizer_step`` (clipping, freezing), in task order."""
        for task in self.task_methods().values():
            task.before_optimizer_step(step)

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Every task's ``after_optimizer_step`` (EMA updates), in task order."""
        for task in self.task_methods().values():
            task.after_optimizer_step(step, total_steps)

    def needs_dataset_features(self, step: int) -> bool:
        """Whether any task wants dataset features before ``step``."""
        # Remembered for take_dataset_features, which the loop calls right after.
        self._wanting_features = [
            name for name, task in self.task_methods().items() if task.needs_dataset_features(step)
        ]
        return bool(self._wanting_features)

    def take_dataset_features(
        self, features: Tensor, slots: Tensor, optimizer: torch.optim.Optimizer
    ) -> dict[str, float]:
        """Hand the features to the tasks that asked for them; their stats under
        ``<task>/``."""
        stats: dict[str, float] = {}
        for name in self._wanting_features:
            for key, value in (
                self.task_methods()[name].take_dataset_features(features, slots, optimizer).items()
            ):
                stats[f"{name}/{key}"] = value
        return stats
