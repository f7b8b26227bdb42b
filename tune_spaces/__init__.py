"""Hyperparameter search spaces for Ray Tune, one module per method family.

``SPACES`` maps a method name to its space (see ``tune_spaces.common`` for the format).
``load_space`` merges a YAML file and ``KEY=DISTRIBUTION`` overrides into a named space,
``check_space`` rejects a bad space before any trial starts, and ``to_tune`` turns one into
Ray Tune's ``param_space``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from tune_spaces.clustering import DEEPCLUSTER, SWAV
from tune_spaces.common import Space
from tune_spaces.contrastive import INSTDISC, MOCO_V2, MOCO_V3, SIMCLR
from tune_spaces.distillation import BYOL, DINO, SIMSIAM
from tune_spaces.masked import MAE, SIMMIM
from tune_spaces.pretext import (
    COLORIZATION,
    CONTEXT_ENCODER,
    CPC,
    DENOISING_AE,
    EXEMPLAR,
    JIGSAW,
    MULTITASK,
    PIRL,
    RELATIVE_PATCH,
    ROTATION,
)
from tune_spaces.redundancy import BARLOW_TWINS, VICREG

SPACES: dict[str, Space] = {
    "simclr": SIMCLR,
    "moco_v2": MOCO_V2,
    "moco_v3": MOCO_V3,
    "instdisc": INSTDISC,
    "byol": BYOL,
    "simsiam": SIMSIAM,
    "barlow_twins": BARLOW_TWINS,
    "vicreg": VICREG,
    "swav": SWAV,
    "deepcluster": DEEPCLUSTER,
    "dino": DINO,
    "mae": MAE,
    "simmim": SIMMIM,
    "rotation": ROTATION,
    "relative_patch": RELATIVE_PATCH,
    "context_encoder": CONTEXT_ENCODER,
    "denoising_ae": DENOISING_AE,
    "jigsaw": JIGSAW,
    "colorization": COLORIZATION,
    "exemplar": EXEMPLAR,
    "pirl": PIRL,
    "cpc": CPC,
    "multitask": MULTITASK,
}
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")


class SpaceError(ValueError):
    """A search space that cannot be swept; the message names the key and the problem."""


def load_space(name: str, file: Path | None = None, overrides: Sequence[str] = ()) -> Space:
    """The space ``name``, then the keys of a YAML ``file``, then ``KEY=YAML`` overrides.

    An override value of ``null`` drops the key from the search (its config value is kept).
    """
    if name not in SPACES:
        raise SpaceError(f"unknown space '{name}'; choose one of {sorted(SPACES)}")
    space = copy.deepcopy(SPACES[name])
    layers: list[dict[str, Any]] = []
    if file is not None:
        loaded = yaml.safe_load(Path(file).read_text()) or {}
        if not isinstance(loaded, dict):
            raise SpaceError(f"{file}: a space file maps config keys to distributions")
        layers.append(loaded)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SpaceError(f"override '{item}' must look like KEY={{uniform: [0.1, 0.5]}}")
        layers.append({key.strip(): yaml.safe_load(value)})
    for layer in layers:
        for key, distribution in layer.items():
            if distribution is None:
                space.pop(key, None)
            else:
                space[key] = distribution
    return space


def _candidates(key: str, distribution: Any) -> list[Any]:
    """The values a distribution can produce at its edges, after checking its shape."""
    if not isinstance(distribution, dict) or len(distribution) != 1:
        raise SpaceError(
            f"{key}: expected one of {DISTRIBUTIONS} with its arguments, "
            f"e.g. {{uniform: [0.1, 0.5]}}; got {distribution!r}"
        )
    ((kind, args),) = distribution.items()
    if kind not in DISTRIBUTIONS:
        raise SpaceError(f"{key}: unknown distribution '{kind}'; use one of {DISTRIBUTIONS}")
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise SpaceError(f"{key}: choice needs a non-empty list, got {args!r}")
        return args
    if not (
        isinstance(args, list)
        and len(args) == 2
        and all(isinstance(a, int | float) and math.isfinite(a) for a in args)
    ):
        raise SpaceError(f"{key}: {kind} needs [low, high] numbers, got {args!r}")
    low, high = args
    if not low < high:
        raise SpaceError(f"{key}: {kind} needs low < high, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise SpaceError(f"{key}: loguniform needs low > 0, got {low}")
    if kind == "randint" and not (isinstance(low, int) and isinstance(high, int)):
        raise SpaceError(f"{key}: randint needs integer bounds, got [{low}, {high}]")
    return [low, high - 1] if kind == "randint" else [low, high]


def check_space(
    space: Space,
    config_values: dict[str, Any],
    validate: Callable[[dict[str, Any]], object],
) -> None:
    """Raise SpaceError unless every value the space can draw makes a valid config.

    ``config_values`` is the base config as nested dicts; each edge value and each choice is
    put into it in turn and checked by ``validate`` (the run config's own rules, e.g.
    ``pipeline.config.from_dict``, raising a ValueError that names the key).
    """
    if not space:
        raise SpaceError("the search space is empty: nothing to sweep")
    workers = config_values["train"]["num_workers"]
    for key, distribution in space.items():
        if key.startswith("run."):
            raise SpaceError(f"{key}: run settings are fixed by the sweep, not searched")
        for value in _candidates(key, distribution):
            if key == "train.batch_size" and value % workers:
                raise SpaceError(
                    f"train.batch_size: choice {value} does not divide by "
                    f"train.num_workers={workers}"
                )
            trial = copy.deepcopy(config_values)
            section, _, name = key.partition(".")
            try:
                trial.setdefault(section, {})[name] = value
                validate(trial)
            except (ValueError, TypeError) as error:
                raise SpaceError(f"{key} = {value!r} gives an invalid config: {error}") from None


def to_tune(space: Space) -> dict[str, Any]:
    """Ray Tune's ``param_space``: flat dotted keys mapped to Tune domains."""
    from ray import tune

    makers = {
        "loguniform": lambda a: tune.loguniform(*a),
        "uniform": lambda a: tune.uniform(*a),
        "randint": lambda a: tune.randint(*a),
        "choice": tune.choice,
    }
    return {key: makers[kind](args) for key, d in space.items() for kind, args in d.items()}
