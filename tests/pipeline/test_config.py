"""Config loading: defaults, YAML presets, overrides, and errors that name the key."""

from pathlib import Path

import pytest
import ray

from pipeline.config import ConfigError, from_dict, load_config
from ssl_models import METHODS
from ssl_models.registry import method_params

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults_and_the_simclr_presets_are_valid():
    assert load_config().train.batch_size == 256
    for preset in CONFIGS.glob("fmnist_simclr*.yaml"):  # every preset: tests/configs
        assert load_config(preset).method_name == "simclr"


def test_overrides_are_parsed_as_yaml_and_typed():
    config = load_config(
        CONFIGS / "fmnist_simclr.yaml",
        ["train.epochs=3", "train.base_lr=1e-2", "data.limit=null", "method.temperature=0.5"],
    )
    assert config.train.epochs == 3
    assert config.train.base_lr == pytest.approx(0.01)
    assert config.data.limit is None
    assert config.method_kwargs["temperature"] == 0.5


def test_integer_given_for_float_key_becomes_float():
    assert isinstance(load_config(None, ["train.base_lr=1"]).train.base_lr, float)


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("train.epoch=3", "train.epoch"),
        ("nosuch.key=1", "nosuch"),
        ("method.temprature=0.1", "method.temprature"),
        ("method.temperature=0", "method.temperature"),
        ("method.temperature=-0.5", "method.temperature"),
        ("train.batch_size=255", "train.batch_size"),
        ("train.epochs=0", "train.epochs"),
        ("train.epochs=two", "train.epochs"),
        ("augment.flip_prob=1.5", "augment.flip_prob"),
        ("augment.local_crops=-1", "augment.local_crops"),
        ("augment.local_crops=6", "augment.local_crops"),  # SimCLR takes no local views
        ("method.name=mae", "model.backbone"),  # masked image modelling needs a ViT
        ("augment.local_crop_scale_min=0.5", "augment.local_crop_scale_min"),  # above max 0.4
        ("model.backbone=vgg", "model.backbone"),
        ("train.optimizer=adam9", "train.optimizer"),
        ("method.name=nosuch", "method.name"),
        ("train.epochs", "train.epochs"),
        ("run.name=..", "run.name"),  # would put the run beside run.root, not in it
        ("run.name=../elsewhere", "run.name"),
        ("run.name=a/b", "run.name"),
        ("run.name=.hidden", "run.name"),
    ],
)
def test_bad_values_name_the_key(override, names):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        load_config(None, [override])


def test_a_multitask_run_takes_only_a_backbone_that_all_its_tasks_work_with():
    masked = ["method.name=multitask", "method.tasks=[rotation,mae]"]
    with pytest.raises(ConfigError, match=r"must be a vit backbone .*'resnet18' \(a cnn"):
        load_config(None, [*masked, "model.backbone=resnet18"])
    assert load_config(None, [*masked, "model.backbone=vit_tiny"]).model.backbone == "vit_tiny"
    with pytest.raises(ConfigError, match="its tasks need different backbones"):
        load_config(None, ["method.name=multitask", "method.tasks=[cpc,mae]"])


def test_torchvision_and_timm_backbones_are_checked_by_name_width_stem_and_kind():
    timm_vit = ["method.name=mae", "model.backbone=timm:vit_tiny_patch16_224", "model.width=1"]
    assert load_config(None, timm_vit).model.backbone == "timm:vit_tiny_patch16_224"
    assert load_config(None, ["model.backbone=torchvision:resnet18", "model.width=1"])
    with pytest.raises(ConfigError, match=r"'model\.backbone' must be one of .*timm:<model>"):
        load_config(None, ["model.backbone=timm:no_such_net"])
    with pytest.raises(ConfigError, match=r"'model\.width' must be 1 for timm:resnet18"):
        load_config(None, ["model.backbone=timm:resnet18"])
    with pytest.raises(ConfigError, match=r"'model\.small_images'.*EfficientNet"):
        load_config(None, ["model.backbone=timm:efficientnet_b0", "model.width=1"])
    with pytest.raises(ConfigError, match=r"must be a vit backbone for method 'mae'.*a cnn"):
        load_config(None, ["method.name=mae", "model.backbone=timm:resnet18", "model.width=1"])
    with pytest.raises(ConfigError, match=r"must be a cnn backbone for method 'cpc'.*a vit"):
        load_config(None, [*timm_vit[1:], "method.name=cpc"])


def test_unknown_key_in_yaml_names_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 2\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_config(path)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_safe_run_names_are_accepted():
    assert load_config(None, ["run.name=fmnist_simclr-2.v1"]).run.name == "fmnist_simclr-2.v1"


def test_switching_method_by_override_drops_the_presets_method_options(tmp_path):
    preset = tmp_path / "simclr.yaml"
    preset.write_text("method: {name: simclr, temperature: 0.2}\nmodel: {backbone: small_cnn}\n")
    mae = load_config(preset, ["method.name=mae", "model.backbone=vit_tiny"])
    assert mae.method == {"name": "mae"}
    # The overrides' own method options stay, whatever their order.
    moco = load_config(preset, ["method.temperature=0.3", "method.name=moco_v3"])
    assert moco.method == {"name": "moco_v3", "temperature": 0.3}
    same = load_config(preset, ["method.name=simclr"])
    assert same.method == {"name": "simclr", "temperature": 0.2}


def _out_of_range(default: object) -> object:
    """A value the option cannot take: negative for numbers (every numeric method option is
    a size, rate, weight, seed or probability), an unknown name for strings and task lists,
    a wrong type for booleans, which have no out-of-range value."""
    if isinstance(default, bool):
        return "yes"
    if isinstance(default, int | float):
        return -1 if isinstance(default, int) else -1.0
    if isinstance(default, str):
        return "no_such_choice"
    if isinstance(default, tuple | list):
        return ["no_such_method"]
    raise AssertionError(f"no bad value for default {default!r}")


#: Options whose default is None (multi-task's optional structures) and their bad values.
_BAD_OPTIONAL = {"weights": [-1.0, 1.0], "task_options": {"no_such_task": {}}}


@pytest.mark.parametrize(
    ("method", "option"),
    [(name, option) for name in sorted(METHODS) for option in method_params(name)],
)
def test_every_method_option_is_range_checked_on_the_driver_before_ray(method, option, monkeypatch):
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("validation started Ray"))
    started = ray.is_initialized()  # another test's session may already run one
    default = method_params(method)[option]
    bad = _BAD_OPTIONAL[option] if default is None else _out_of_range(default)
    with pytest.raises(ConfigError, match=f"'method.{option}'"):
        from_dict({"method": {"name": method, option: bad}})
    assert ray.is_initialized() == started


def test_a_bad_task_option_inside_multitask_is_named():
    bad = {"name": "multitask", "tasks": ["rotation"], "task_options": {"rotation": {}}}
    bad["task_options"]["rotation"]["classifier_hidden_dim"] = -1
    with pytest.raises(ConfigError, match=r"'method.task_options' rotation.classifier_hidden_dim"):
        from_dict({"method": bad})
