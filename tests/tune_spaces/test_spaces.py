"""Search spaces: every shipped space is valid, overrides merge, bad spaces are rejected
with the key and the problem named."""

import pytest
import torch
from ray import tune

from pipeline.config import from_dict
from ssl_models import METHODS, Batch, build_method
from tune_spaces import SPACES, SpaceError, check_space, load_space, to_tune


def _base(method: str = "simclr", **train) -> dict:
    # e.g. a ViT for masked image modelling
    kinds = METHODS[method].requirements(METHODS[method].option_defaults()).backbone_kinds
    model = {"backbone": {"vit": "vit_tiny", "cnn": "small_cnn"}[kinds[0]]} if kinds else {}
    values = from_dict({"method": {"name": method}, "model": model}).to_dict()
    values["train"].update(train)
    return values


def test_every_method_has_a_valid_space():
    assert set(SPACES) == set(METHODS)
    for method, space in SPACES.items():
        check_space(space, _base(method), from_dict)
        check_space(space, _base(method, num_workers=4), from_dict)  # batch choices divide by 4


@pytest.mark.parametrize("method", ["mae", "simmim"])
def test_masked_image_spaces_pin_adamw_and_train_at_both_mask_ratio_edges(method, one_thread):
    space = SPACES[method]
    assert space["train.optimizer"] == {"choice": ["adamw"]}  # base_lr is on AdamW's scale
    assert "augment.strength" not in space  # the papers use no colour distortion
    for ratio in space["method.mask_ratio"]["uniform"]:
        model = build_method(
            method, backbone="vit_tiny", width=0.25, in_channels=1, mask_ratio=ratio
        )
        out = model(Batch([torch.randn(2, 1, 28, 28)]))  # Fashion-MNIST size: 49 patches
        assert torch.isfinite(out.loss)
        assert out.logs["mask_ratio"].item() == pytest.approx(ratio, abs=0.5 / 49)


def test_overrides_from_file_and_flags_merge_in_order(tmp_path):
    file = tmp_path / "space.yaml"
    file.write_text("method.temperature: {uniform: [0.1, 0.2]}\naugment.strength: null\n")
    space = load_space(
        "simclr", file, ["method.temperature={loguniform: [0.05, 0.3]}", "train.epochs=null"]
    )
    assert space["method.temperature"] == {"loguniform": [0.05, 0.3]}
    assert "augment.strength" not in space
    assert space["train.base_lr"] == SPACES["simclr"]["train.base_lr"]
    assert "augment.strength" in SPACES["simclr"], "the shipped space was modified"


@pytest.mark.parametrize(
    ("key", "distribution", "message"),
    [
        ("method.temperature", {"loguniform": [0.5, 0.1]}, "low < high"),
        ("method.temperature", {"loguniform": [0.0, 0.1]}, "low > 0"),
        ("method.temperature", {"normal": [0.1, 0.2]}, "unknown distribution 'normal'"),
        ("method.temperature", [0.1, 0.2], "expected one of"),
        ("method.temperature", {"uniform": [-1.0, 0.5]}, r"method.temperature = -1.0"),
        ("train.batch_size", {"choice": [256, 255]}, "255 does not divide"),
        ("method.queue_size", {"choice": [4096]}, "queue_size"),  # not a SimCLR option
        ("train.no_such_key", {"uniform": [0.1, 0.2]}, "no_such_key"),
        ("run.seed", {"randint": [0, 5]}, "fixed by the sweep"),
        ("model.width", {"choice": []}, "non-empty list"),
    ],
)
def test_bad_spaces_are_rejected_naming_the_key(key, distribution, message):
    with pytest.raises(SpaceError, match=message):
        check_space({key: distribution}, _base(), from_dict)


def test_unknown_space_and_malformed_override():
    with pytest.raises(SpaceError, match="unknown space 'simclrr'"):
        load_space("simclrr")
    with pytest.raises(SpaceError, match="KEY="):
        load_space("simclr", None, ["method.temperature"])


def test_to_tune_builds_the_matching_domains():
    param_space = to_tune(
        {
            "a.lr": {"loguniform": [0.01, 1.0]},
            "a.s": {"uniform": [0.0, 1.0]},
            "a.n": {"randint": [1, 4]},
            "a.b": {"choice": [64, 128]},
        }
    )
    assert isinstance(param_space["a.lr"], tune.search.sample.Float)
    assert param_space["a.lr"].lower == 0.01 and param_space["a.lr"].upper == 1.0
    assert isinstance(param_space["a.n"], tune.search.sample.Integer)
    assert param_space["a.b"].categories == [64, 128]
