"""Multi-task self-supervision's data stage (Doersch & Zisserman 2017, arXiv:1708.07860):
the global views split among the tasks, each task's own transform run on its share, and the
columns numbered and named so that ``MultiTask.forward`` can split them again."""

from dataclasses import dataclass

import torch
from torch import Tensor

from ssl_models.transforms.pretext import PretextViews, split_columns

#: ``target_<task>__<name>``: the task a shipped target belongs to.
TASK_SEPARATOR = "__"
#: The target holding how many view columns each task shipped.
VIEW_COUNTS = "views_per_task"


@dataclass(frozen=True)
class TaskViews:
    """Data stage: split the global views among the tasks, run each task's transform, and
    number the views and name the targets so that ``forward`` can split them again."""

    tasks: tuple[str, ...]
    views_per_task: tuple[int, ...]
    transforms: tuple[PretextViews | None, ...]

    def __call__(self, views: list[Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        """Run every task's transform on its share of ``views``; returns the keys above."""
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
                out[f"target_{task}{TASK_SEPARATOR}{name}"] = value
            shipped.append(len(own))
        counts = torch.tensor(shipped, device=views[0].device)
        out[f"target_{VIEW_COUNTS}"] = counts.expand(len(views[0]), -1).contiguous()
        return out
