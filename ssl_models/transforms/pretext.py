"""The contract between a pretext task's data-stage transform and its method's ``forward``.

A transform ``make(views, generator)`` maps the batch's augmented uint8 global views
(N, C, H, W) to named columns with N rows: ``view_<i>`` uint8 images (shape (N, ..., C, h, w):
tiles and patches may add a dimension), which the loop normalises and hands to ``forward`` as
``Batch.views`` in index order, and ``target_<name>`` tensors (labels, masks), handed over as
``Batch.targets[name]``. It runs in the Ray Data stage on CPU workers (or on the training
device), so it is torch code that draws all randomness from the CPU generator and pickles.
"""

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

#: A pretext task's data-stage transform: ``make(views, generator) -> {column: tensor}``.
PretextViews = Callable[[list[Tensor], torch.Generator], dict[str, Tensor]]


def split_columns(columns: Mapping[str, Tensor]) -> tuple[list[Tensor], dict[str, Tensor]]:
    """A transform's output -> (the ``view_<i>`` columns in index order, the
    ``target_<name>`` columns by name); other columns are left out."""
    views = [columns[f"view_{i}"] for i in range(sum(k.startswith("view_") for k in columns))]
    targets = {k.removeprefix("target_"): v for k, v in columns.items() if k.startswith("target_")}
    return views, targets
