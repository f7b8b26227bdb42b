"""Checkpoint files: one ``checkpoint.pt`` per Ray Train checkpoint directory.

It holds everything a resume or an evaluation needs: the method's full state (backbone,
heads and any method state), optimizer state, the completed epoch and global step (the
learning-rate schedule is a pure function of the step), the torch RNG state, the run's
config and the input normalisation. Files are written under a temporary name and renamed,
so a crash mid-save never leaves a file that looks complete.

Reading works on any location (pipeline.data.locations): a run or checkpoint directory may be a
local path or an object-storage URI (``s3://bucket/runs/NAME/checkpoint_*``, as Ray Train's
storage layer writes them).

In memory a checkpoint is a :class:`CheckpointState`; on disk it is that dataclass's fields
as a plain dict, the format every saved run already has, so ``torch.load(weights_only=True)``
reads it and runs saved before the dataclass existed still load.
"""

from __future__ import annotations

import io
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from pipeline.config import Config, from_dict
from pipeline.data import locations
from ssl_models import SSLMethod, build_method
from ssl_models.pretrained import BackboneWeights

CHECKPOINT_FILE = "checkpoint.pt"

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class CheckpointState:
    """Everything a resume or an evaluation needs from one epoch's end."""

    model: dict[str, torch.Tensor]  # the method's state_dict: backbone, heads, queues, banks
    optimizer: dict[str, Any]
    epoch: int  # epochs completed
    step: int  # global optimiser steps taken
    torch_rng: torch.Tensor  # rank 0's generator; each rank derives its own from it
    config: dict[str, Any]  # Config.to_dict() of the run
    channels: int
    image_size: int
    num_images: int | None = None  # the training set's size (memory banks); early runs lack it
    mean: list[float]  # per-channel input normalisation
    std: list[float]
    metrics: dict[str, Any]  # the epoch's report
    online_probe: dict[str, Any] | None = None  # OnlineProbe.state_dict(); None without one


def save_checkpoint(directory: str | Path, state: CheckpointState) -> Path:
    """Write ``state`` to ``directory``/checkpoint.pt as a plain dict (see the module
    docstring), atomically."""
    path = Path(directory) / CHECKPOINT_FILE
    tmp = path.with_suffix(".pt.tmp")
    # The fields shallowly: dataclasses.asdict would deep-copy every tensor first.
    torch.save(dict(vars(state)), tmp)
    os.replace(tmp, path)
    return path


def checkpoint_file(path: str | os.PathLike[str]) -> str:
    """The ``checkpoint.pt`` of a checkpoint directory, or ``path`` itself when it is the
    file; FileNotFoundError when neither is there."""
    inside = locations.join(path, CHECKPOINT_FILE)
    if locations.is_file(inside):
        return inside
    if locations.is_file(path):
        return str(path)
    raise FileNotFoundError(f"no checkpoint at {inside}")


def load_checkpoint(path: str | os.PathLike[str]) -> CheckpointState:
    """Load a checkpoint file, or the one inside a checkpoint directory (tensors only), from a
    local path or an object-storage URI."""
    data = locations.read_bytes(checkpoint_file(path))
    return CheckpointState(**torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))


def _is_complete(location: str) -> bool:
    """Whether a checkpoint file has its zip central directory (only its tail is read)."""
    filesystem, path = locations.resolve(location)
    try:
        with filesystem.open_input_file(path) as handle:
            return zipfile.is_zipfile(handle)
    except OSError:
        return False


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> str:
    """The newest complete ``checkpoint_*`` directory of a run (Ray Train's names sort by
    time), a local path or a URI like ``run_dir``. A file cut short by a crash while it was
    copied into the run directory has no zip central directory and is passed over for the
    one before it."""
    filesystem, root = locations.resolve(run_dir)
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError as err:
        raise FileNotFoundError(f"no checkpoint in {run_dir} ({err})") from err
    names = sorted(
        (info.base_name for info in infos if info.type == pafs.FileType.Directory),
        reverse=True,
    )
    for name in (n for n in names if n.startswith("checkpoint_")):
        candidate = locations.join(str(run_dir), name)
        path = locations.join(candidate, CHECKPOINT_FILE)
        if locations.is_file(path):
            if _is_complete(path):
                return candidate
            log.warning("skipping incomplete checkpoint %s", candidate)
    raise FileNotFoundError(f"no checkpoint in {run_dir} yet (none is complete)")


def find_checkpoint(path: str | os.PathLike[str]) -> str:
    """A checkpoint directory or file as given, else the run directory's latest checkpoint
    (local paths and object-storage URIs alike)."""
    path = locations.absolute(path)
    if locations.is_file(locations.join(path, CHECKPOINT_FILE)) or locations.is_file(path):
        return path
    return latest_checkpoint(path)


def method_from_checkpoint(
    path: str | os.PathLike[str],
) -> tuple[SSLMethod, Config, CheckpointState]:
    """Rebuild the trained method (eval mode) and its config from a checkpoint."""
    state = load_checkpoint(path)
    config = from_dict(state.config)
    method = build_method_for(config, state.channels, state.num_images)
    method.load_state_dict(state.model)
    return method.eval(), config, state


def build_method_for(
    config: Config,
    channels: int,
    num_images: int | None,
    backbone_weights: BackboneWeights | None = None,
) -> SSLMethod:
    """The config's method on a fresh backbone for ``channels``-channel inputs and a
    training set of ``num_images`` images (used by memory-bank methods), the backbone
    started from ``backbone_weights`` when given."""
    return build_method(
        config.method_name,
        backbone=config.model.backbone,
        width=config.model.width,
        in_channels=channels,
        small_images=config.model.small_images,
        num_images=num_images,
        backbone_weights=backbone_weights,
        **config.method_kwargs,
    )


def random_init_method(config: Config, state: CheckpointState) -> SSLMethod:
    """The checkpoint's architecture with the run's seed and random weights (eval mode): the
    floor every protocol is compared with. The same seed gives the same weights in every
    process, so Ray workers can each build it."""
    torch.manual_seed(config.run.seed)
    return build_method_for(config, state.channels, state.num_images).eval()


# What a resumed run must share with the run that wrote its checkpoints: the method's state,
# the optimizer's state and the step count all depend on them.
RESUME_KEYS = (
    "model",
    "method",
    "data.train",
    "data.limit",
    "data.image_size",
    "train.optimizer",
    "train.batch_size",
)


def check_resumable(run_dir: str | os.PathLike[str], config: Config) -> int:
    """The epochs ``run_dir``'s checkpoints completed (0 for none); raise if they come from
    a run that ``config`` cannot continue.

    A run resumes by name; reusing a name with another method, model, optimizer, batch size
    or dataset would load state that does not fit (or silently train something else).
    """
    try:
        checkpoint = latest_checkpoint(run_dir)
    except FileNotFoundError:
        return 0
    state = load_checkpoint(checkpoint)
    saved, wanted = state.config, config.to_dict()

    def lookup(values: dict[str, Any], key: str) -> Any:
        node: Any = values
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    changed = [
        f"{key}: {lookup(saved, key)!r} -> {lookup(wanted, key)!r}"
        for key in RESUME_KEYS
        if lookup(saved, key) != lookup(wanted, key)
    ]
    if changed:
        raise ValueError(
            f"run '{config.run.name}' already has checkpoints in {run_dir} from a different "
            f"setup ({'; '.join(changed)}); pick a new run.name to start afresh, or delete "
            "that directory"
        )
    return state.epoch
