"""Typed run configuration: YAML presets, ``--set key=value`` overrides and validation.

A config is a tree of dataclasses. Every key a user writes is checked: unknown keys, wrong
types and out-of-range values stop the run before Ray starts, with an error that names the
dotted key and what is allowed. The ``method`` section is free-form because each method has
its own knobs; it is checked against the method's constructor through the registry, and
its values against the method's own ``validate`` and ``requirements``, on the driver.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.data import locations
from ssl_models import BACKBONES, METHODS
from ssl_models.backbones import backbone_kind, is_backbone
from ssl_models.library_backbones import split_name
from ssl_models.method import MethodRequirements
from ssl_models.optim import OPTIMIZERS
from ssl_models.options import OptionError, Rule, check_options
from ssl_models.registry import method_params


class ConfigError(ValueError):
    """A configuration key is unknown, mistyped or out of range."""


DEFAULT_METHOD = "simclr"  # what a config without method.name trains
TRACKERS = ("tensorboard", "mlflow", "wandb")  # what run.trackers may name
# The package each tracker needs beyond the core dependencies (the 'tracking' extra).
_TRACKER_PACKAGES = {"mlflow": "mlflow", "wandb": "wandb"}
# What to pick for a method that needs a kind of backbone (ssl_models.backbones).
KIND_EXAMPLES = {
    "vit": "e.g. vit_tiny, vit_small or timm:vit_small_patch16_224",
    "cnn": "e.g. small_cnn, resnet18, resnet50 or timm:resnet18",
}


@dataclass
class RunConfig:
    """The run's name, the root its directory goes under (``root/name``) and its seed."""

    name: str = "fmnist-simclr"
    root: str = "runs"  # local directory, or s3:// / gs:// URI for Ray Train storage
    seed: int = 0
    # Where the run's params, per-epoch metrics, evaluation rows and exported model card go
    # (pipeline.train.trackers): any of tensorboard (RUN_DIR/tensorboard), mlflow, wandb.
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    # MLflow's tracking server; None: $MLFLOW_TRACKING_URI, else MLflow's own local store
    # (./mlflow.db, artifacts in ./mlruns). Made absolute on the driver: workers agree.
    tracking_uri: str | None = None
    experiment: str = "ray-ssl"  # the MLflow experiment and the W&B project


@dataclass
class DataConfig:
    """Which shards train and evaluate, and how the data stage reads and decodes them."""

    train: str = "data/shards/fashion-mnist/train"  # shards used for pretraining (labels unused)
    eval_train: str = "data/shards/fashion-mnist/train"  # labelled shards: the kNN memory bank
    eval_test: str = "data/shards/fashion-mnist/test"  # labelled shards: the kNN queries
    limit: int | None = None  # pretrain on the first N images only
    image_size: int | None = None  # None: the shards' own (uniform) size
    decode_tasks: int = 2  # parallel decode + augment tasks in the Ray Data stage
    prefetch_batches: int = 2
    # Train on one fixed batch of random views from memory, no data path at all: the speed
    # ceiling that benchmarks/training.py compares the real pipeline against.
    synthetic: bool = False


@dataclass
class AugmentConfig:
    """SimCLR view recipe; ``strength`` is the paper's colour-distortion strength s."""

    strength: float = 0.5
    crop_scale_min: float = 0.2
    crop_ratio_max: float = 4 / 3  # aspect ratios drawn log-uniformly in [1/max, max]
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.0  # SimCLR drops blur for 32 px images; use 0.5 for large images
    solarize_prob: float = 0.0  # BYOL: invert the pixels >= 128 of a drawn share of views
    # Per-view settings: a list of {key: value} over the keys above, one per global view and
    # one more for all local views; each overrides the section's keys for its view. None:
    # the method's paper recipe (BYOL's asymmetric pair, DINO's three kinds; SimCLR none).
    views: list[dict[str, float]] | None = None
    # Multi-crop (SwAV, Caron et al. 2020; DINO): small "local" views added after the global
    # ones, for methods that take them. Their side is local_size px (0: 96/224 of the image
    # side, the papers' ratio) and they cover local_crop_scale_min..max of the image.
    local_crops: int = 0
    local_size: int = 0
    local_crop_scale_min: float = 0.05
    local_crop_scale_max: float = 0.4
    # Draw the views on the training device (GPU) from decoded images, for nodes whose CPUs
    # cannot keep up; same recipe. False: the Ray Data stage draws them on CPU workers.
    on_train_device: bool = False


@dataclass
class ModelConfig:
    """The backbone: its architecture, width multiplier, small-image stem and the weights it
    starts from."""

    # A built-in name, or torchvision:<name> / timm:<name> (ssl_models.backbones)
    backbone: str = "resnet18"
    width: float = 0.25  # built-in backbones only; torchvision and timm models need 1.0
    small_images: bool = True  # for 28-64 px: ResNet 3x3 stem, no max-pool; ViT 4 px patches
    # A safetensors or torch state_dict file (local path or s3:// / gs:// URI) the backbone
    # starts from; None: random initialisation.
    pretrained: str | None = None
    # Batch norm over the global batch of all workers (ssl_models.batch_norm); None: the
    # method's paper (on for SimCLR, BYOL, MoCo v3, Barlow Twins, VICReg).
    sync_bn: bool | None = None


@dataclass
class TrainConfig:
    """Pretraining: epochs, batch, workers, optimiser and schedule, restarts and the online
    monitors."""

    epochs: int = 2
    batch_size: int = 256  # global: split evenly over workers
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    amp: bool = True  # mixed precision, used only on GPU
    optimizer: str = "lars"
    base_lr: float = 0.3  # scaled by batch_size / 256
    weight_decay: float = 1e-6
    momentum: float = 0.9
    # LARS trust coefficient. The SimCLR paper's 0.001 suits batch 4096 for hundreds of
    # epochs; solo-learn's 0.02 learns far faster at batch 256 over a few epochs.
    lars_eta: float = 0.02
    warmup_epochs: float = 1.0
    log_every_steps: int = 25
    max_failures: int = 2  # worker-group restarts from the latest checkpoint before giving up
    online_knn_bank: int = 5000  # per-epoch kNN monitor: train images in the bank (0 = off)
    online_knn_queries: int = 1000  # ... and further train images queried against it
    online_knn_k: int = 20  # a 5k bank is too small for the final protocol's k=200
    # Linear head on detached features of the training stream, trained alongside (solo-learn,
    # lightly); its per-epoch accuracy is logged. Needs labels in data.train's shards.
    online_probe: bool = True


@dataclass
class EvalConfig:
    """The kNN protocol's k and temperature, and the batch size of embedding."""

    knn_k: int = 200
    knn_temperature: float = 0.1
    batch_size: int = 512


@dataclass
class Config:
    """A whole run, one field per YAML section; ``method`` holds the method's name and the
    options set for it."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: dict[str, Any] = field(default_factory=lambda: {"name": DEFAULT_METHOD})
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """The config as nested plain dicts, in the YAML's shape."""
        return dataclasses.asdict(self)

    @property
    def method_name(self) -> str:
        """The registered name of the method to train."""
        return self.method["name"]

    @property
    def method_kwargs(self) -> dict[str, Any]:
        """The ``method.*`` options the config sets (without defaults)."""
        return {k: v for k, v in self.method.items() if k != "name"}

    @property
    def method_options(self) -> dict[str, Any]:
        """Every option of the method: its defaults, then the config's ``method.*`` keys."""
        return method_params(self.method_name) | self.method_kwargs

    @property
    def global_bn(self) -> bool:
        """Whether batch norm covers the global batch: ``model.sync_bn``, else the paper's."""
        if self.model.sync_bn is not None:
            return self.model.sync_bn
        return self.method_requirements.global_bn

    @property
    def method_requirements(self) -> MethodRequirements:
        """What the method, with these options, asks of the data stage and the run."""
        return METHODS[self.method_name].requirements(self.method_options)


SAFE_NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit"


def is_safe_name(name: str) -> bool:
    """A run or sweep name that stays one directory under its root (no '/', no '..')."""
    return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) is not None


_COUNT = Rule(lambda x: x > 0, "an integer >= 1")
_POSITIVE = Rule(lambda x: x > 0, "a number > 0")
_PROBABILITY = Rule(lambda x: 0.0 <= x <= 1.0, "a probability in [0, 1]")
_NON_NEGATIVE_INTEGER = Rule(lambda x: x >= 0, "an integer >= 0")
_CROP_SCALE = Rule(lambda x: 0 < x <= 1, "a number in (0, 1]")

# The range of every config key that has one, by section: the same Rule and check_options
# that method options use (ssl_models.options), so both name a key the same way.
_RULES: dict[str, dict[str, Rule]] = {
    "run": {
        "name": Rule(is_safe_name, SAFE_NAME_RULE),
        "trackers": Rule(
            lambda names: len(set(names)) == len(names) and set(names) <= set(TRACKERS),
            f"a list of distinct names from {list(TRACKERS)}",
        ),
        "experiment": Rule(lambda s: bool(s.strip()), "a non-empty name"),
    },
    "data": {
        "limit": Rule(lambda x: x is None or x > 0, "null or a positive integer"),
        "image_size": Rule(lambda x: x is None or x >= 8, "null or an integer >= 8"),
        "decode_tasks": _COUNT,
        "prefetch_batches": _NON_NEGATIVE_INTEGER,
    },
    "augment": {
        "strength": Rule(lambda x: 0 <= x <= 2, "a number in [0, 2]"),
        "crop_scale_min": _CROP_SCALE,
        "crop_ratio_max": Rule(lambda x: x >= 1, "a number >= 1"),
        "flip_prob": _PROBABILITY,
        "jitter_prob": _PROBABILITY,
        "grayscale_prob": _PROBABILITY,
        "blur_prob": _PROBABILITY,
        "solarize_prob": _PROBABILITY,
        "local_crops": _NON_NEGATIVE_INTEGER,
        "local_size": Rule(lambda x: x == 0 or x >= 4, "0 (automatic) or an integer >= 4"),
        "local_crop_scale_min": _CROP_SCALE,
        "local_crop_scale_max": _CROP_SCALE,
    },
    "model": {
        "backbone": Rule(
            is_backbone, f"one of {sorted(BACKBONES)}, torchvision:<model> or timm:<model>"
        ),
        "width": Rule(lambda x: 0 < x <= 4, "a number in (0, 4]"),
    },
    "train": {
        "epochs": _COUNT,
        "batch_size": Rule(lambda x: x >= 2, "an integer >= 2"),
        "num_workers": _COUNT,
        "cpus_per_worker": _POSITIVE,
        "optimizer": Rule(lambda s: s in OPTIMIZERS, f"one of {sorted(OPTIMIZERS)}"),
        "base_lr": _POSITIVE,
        "weight_decay": Rule(lambda x: x >= 0, "a number >= 0"),
        "momentum": Rule(lambda x: 0 <= x < 1, "a number in [0, 1)"),
        "lars_eta": _POSITIVE,
        "warmup_epochs": Rule(lambda x: x >= 0, "a number >= 0"),
        "log_every_steps": _COUNT,
        "max_failures": _NON_NEGATIVE_INTEGER,
        "online_knn_bank": Rule(lambda x: x >= 0, "an integer >= 0 (0 turns the monitor off)"),
        "online_knn_queries": _COUNT,
        "online_knn_k": _COUNT,
    },
    "eval": {
        "knn_k": _COUNT,
        "knn_temperature": _POSITIVE,
        "batch_size": _COUNT,
    },
}


def _type_ok(value: Any, annotation: Any) -> bool:
    if annotation is Any:
        return True
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    origin = typing.get_origin(annotation)
    return isinstance(value, origin or annotation)


def _as_float(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` as a string and ``1`` as an int; a float key takes both."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _build_section(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    checked = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}"
        if key not in hints:
            raise ConfigError(f"unknown config key '{dotted}'; allowed: {sorted(hints)}")
        if _type_ok(0.5, hints[key]):  # a float key
            value = _as_float(value)
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"config key '{dotted}' must be of type {hints[key]}, got {value!r}")
        checked[key] = value
    return cls(**checked)


def _like(value: Any, default: Any) -> bool:
    """Whether a method option's value has its default's type: an int passes for a float,
    a list for a tuple; a None default (an optional structure, such as multi-task's
    weights) leaves the check to the method's constructor."""
    if default is None:
        return True
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, list | tuple):
        return isinstance(value, list | tuple)
    return isinstance(value, type(default))


def _key_error(section: str, error: OptionError) -> ConfigError:
    """``error``, a key of ``section`` out of its range, as the config's error naming the key."""
    return ConfigError(f"config key '{section}.{error.option}' {error.problem}")


def _validate_method(method: dict[str, Any]) -> None:
    name = method.get("name")
    if name not in METHODS:
        raise ConfigError(
            f"config key 'method.name' must be one of {sorted(METHODS)}, got {name!r}"
        )
    allowed = method_params(name)
    for key, value in method.items():
        if key == "name":
            continue
        if key not in allowed:
            raise ConfigError(
                f"unknown config key 'method.{key}' for method '{name}'; allowed: {sorted(allowed)}"
            )
        if not _like(value, allowed[key]):
            raise ConfigError(
                f"config key 'method.{key}' must be like {allowed[key]!r}, got {value!r}"
            )
    options = allowed | {k: v for k, v in method.items() if k != "name"}
    try:  # the method's own range checks, here on the driver rather than in a Train worker
        METHODS[name].validate(options)
        METHODS[name].requirements(options)
    except OptionError as error:
        raise _key_error("method", error) from None


def _validate_backbone(model: ModelConfig, method: str, kinds: tuple[str, ...] | None) -> None:
    """The backbone's width, stem and kind against what the method works with."""
    if split_name(model.backbone) is not None and model.width != 1.0:
        raise ConfigError(
            f"config key 'model.width' must be 1 for {model.backbone} (a torchvision or timm "
            f"model's size is in its name, e.g. timm:resnet50 or timm:wide_resnet50_2), got "
            f"{model.width}"
        )
    try:
        kind = backbone_kind(model.backbone, model.small_images)
    except ValueError as error:  # a library model whose stem small_images cannot adapt
        raise ConfigError(f"config key 'model.small_images': {error}") from None
    if kinds is not None and kind not in kinds:
        raise ConfigError(
            f"config key 'model.backbone' must be a {' or '.join(kinds)} backbone for method "
            f"{method!r}, got {model.backbone!r} (a {kind}; {KIND_EXAMPLES[kinds[0]]})"
        )


def check_trackers_installed(config: Config) -> None:
    """Raise, naming run.trackers, when a named tracker's package is missing. Training and
    sweeps call it before Ray starts, and opening the trackers does; loading the config does
    not, so a run tracked elsewhere still loads (load_encoder) where mlflow is missing."""
    for tracker in config.run.trackers:
        package = _TRACKER_PACKAGES.get(tracker)
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"config key 'run.trackers' names {tracker!r}, but {package} is not installed; "
                "install it with: pip install 'ray-ssl[tracking]'"
            )


#: The augment keys a per-view entry (augment.views) may set.
VIEW_KEYS = (
    "strength",
    "crop_scale_min",
    "crop_ratio_max",
    "flip_prob",
    "jitter_prob",
    "grayscale_prob",
    "blur_prob",
    "solarize_prob",
)


def _validate_views(augment: AugmentConfig, needs: MethodRequirements) -> None:
    """augment.views: one mapping per global view (and one for the local views), each key
    a recipe key within its range; errors name the entry and the key."""
    if augment.views is None:
        return
    counts = [needs.global_views] + ([needs.global_views + 1] if augment.local_crops else [])
    if len(augment.views) not in counts:
        raise ConfigError(
            f"config key 'augment.views' must have {' or '.join(map(str, counts))} entries "
            f"(one per global view{', then one for the local views' if augment.local_crops else ''}"
            f"), got {len(augment.views)}"
        )
    for index, entry in enumerate(augment.views):
        where = f"augment.views[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"config key '{where}' must be a mapping of keys, got {entry!r}")
        unknown = sorted(set(entry) - set(VIEW_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown config key '{where}.{unknown[0]}'; allowed: {list(VIEW_KEYS)}"
            )
        for key, value in entry.items():
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ConfigError(f"config key '{where}.{key}' must be a number, got {value!r}")
        try:
            check_options(entry, **{key: _RULES["augment"][key] for key in entry})
        except OptionError as error:
            raise _key_error(where, error) from None


def validate(config: Config) -> Config:
    """Check every range rule and cross-key constraint; raise ConfigError naming the key."""
    for section, rules in _RULES.items():
        try:
            check_options(vars(getattr(config, section)), **rules)
        except OptionError as error:
            raise _key_error(section, error) from None
    train = config.train
    if train.batch_size % train.num_workers:
        raise ConfigError(
            f"config key 'train.batch_size' ({train.batch_size}) must be divisible by "
            f"'train.num_workers' ({train.num_workers})"
        )
    if train.batch_size // train.num_workers < 2:
        raise ConfigError("config key 'train.batch_size' must give each worker at least 2 images")
    augment = config.augment
    if augment.local_crop_scale_min > augment.local_crop_scale_max:
        raise ConfigError(
            "config key 'augment.local_crop_scale_min' must not exceed "
            f"'augment.local_crop_scale_max' ({augment.local_crop_scale_max})"
        )
    _validate_method(config.method)
    needs = config.method_requirements
    _validate_views(augment, needs)
    _validate_backbone(config.model, config.method_name, needs.backbone_kinds)
    if augment.local_crops and not needs.local_views:
        multi_crop = sorted(
            name
            for name, cls in METHODS.items()
            if cls.requirements(cls.option_defaults()).local_views
        )
        raise ConfigError(
            f"config key 'augment.local_crops' must be 0 for method {config.method_name!r}, "
            f"which takes no local views (methods that do: {multi_crop or 'none yet'})"
        )
    return config


def from_dict(values: dict[str, Any]) -> Config:
    """Build and validate a Config from nested dicts (missing keys take their defaults)."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        if name not in sections:
            raise ConfigError(f"unknown config section '{name}'; allowed: {sorted(sections)}")
        if not isinstance(value, dict):
            raise ConfigError(f"config section '{name}' must be a mapping, got {value!r}")
        if name == "method":
            kwargs[name] = {"name": DEFAULT_METHOD, **value}
        else:
            kwargs[name] = _build_section(typing.get_type_hints(Config)[name], value, name)
    return validate(Config(**kwargs))


def set_value(values: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``values[section][key] = value`` for ``dotted == "section.key"`` (in place)."""
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"'{dotted}' is not a config key of the form section.key")
    section, key = parts
    values.setdefault(section, {})
    if not isinstance(values[section], dict):
        raise ConfigError(f"config section '{section}' must be a mapping")
    values[section][key] = value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings; values are parsed as YAML (1e-3, true, null, [a, b]).

    An override that switches ``method.name`` to another method starts the method section
    afresh: the preset's options belong to its own method (a SimCLR preset's temperature
    means nothing to MAE), so only the overrides' ``method.*`` options are kept.
    """
    parsed = []
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        parsed.append((dotted, yaml.safe_load(raw) if raw.strip() else None))
    method = values.get("method")
    current = method.get("name", DEFAULT_METHOD) if isinstance(method, dict) else None
    if current and any(d.strip() == "method.name" and v != current for d, v in parsed):
        values["method"] = {}
    for dotted, value in parsed:
        set_value(values, dotted, value)
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML preset (or the defaults when path is None) and apply overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        values = loaded or {}
    return from_dict(apply_overrides(values, overrides or []))


def to_yaml(config: Config) -> str:
    """The config as YAML, sections and keys in their declared order."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def with_absolute_paths(config: Config) -> Config:
    """Resolve relative local data paths and run root against the current directory.

    Ray Train workers run in their own working directory, so a relative path that is right
    for the driver would point elsewhere on a worker. URIs (s3://, gs://) pass unchanged.
    """
    data = dataclasses.replace(
        config.data,
        train=locations.absolute(config.data.train),
        eval_train=locations.absolute(config.data.eval_train),
        eval_test=locations.absolute(config.data.eval_test),
    )
    run = dataclasses.replace(
        config.run,
        root=locations.absolute(config.run.root),
        tracking_uri=(
            absolute_tracking_uri(config.run.tracking_uri)
            if "mlflow" in config.run.trackers
            else config.run.tracking_uri
        ),
    )
    return dataclasses.replace(config, data=data, run=run)


def absolute_tracking_uri(uri: str | None) -> str:
    """The MLflow tracking URI every process of a run agrees on: ``uri``, else
    $MLFLOW_TRACKING_URI, else MLflow's own default local store (``sqlite:///mlflow.db``);
    a relative SQLite file or store directory becomes absolute, a server passes unchanged."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    sqlite = "sqlite:///"
    if uri.startswith(sqlite) and not uri.startswith(sqlite + "/"):  # sqlite:///x.db: relative
        return sqlite + locations.absolute(uri.removeprefix(sqlite))
    if not urllib.parse.urlparse(uri).scheme and uri != "databricks":  # MLflow's file store
        return Path(uri).expanduser().resolve().as_uri()
    return uri
