"""Command line: helpful --help, clear errors before Ray starts, prepare on a folder."""

import pytest
from PIL import Image

from pipeline.cli import main

COMMANDS = ["prepare", "pretrain", "evaluate", "embed", "export", "retrieval", "preview"]
COMMANDS += ["report", "tune", "demo"]
DATA_KEYS = [("train", "train"), ("eval_train", "train"), ("eval_test", "test")]


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_help_teaches(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "usage:" in out and len(out.splitlines()) > 8
    if command != "demo":
        assert "Examples:" in out


def test_a_pretrained_file_that_does_not_fit_stops_before_ray(
    tmp_path, capsys, monkeypatch, fmnist_small
):
    def no_ray() -> None:
        raise AssertionError("Ray was started for weights that do not fit")

    monkeypatch.setattr("pipeline.train.driver.init_ray", no_ray)
    weights = tmp_path / "w.pt"
    import torch

    torch.save({"conv1.weight": torch.zeros(1)}, weights)
    overrides = [f"data.{key}={fmnist_small[split]}" for key, split in DATA_KEYS]
    overrides.append(f"model.pretrained={weights}")
    status = main(["pretrain", *(arg for value in overrides for arg in ("--set", value))])
    err = capsys.readouterr().err
    assert status == 2 and "model.pretrained" in err and "missing keys" in err


def test_config_error_stops_before_ray_and_names_the_key(capsys, monkeypatch):
    def no_ray() -> None:
        raise AssertionError("Ray was started for a bad config")

    monkeypatch.setattr("pipeline.train.driver.init_ray", no_ray)
    assert main(["pretrain", "--set", "method.temperature=0"]) == 2
    assert "method.temperature" in capsys.readouterr().err


def test_unknown_source_is_explained(capsys):
    assert main(["prepare", "imagenet"]) == 2
    assert "folder:PATH" in capsys.readouterr().err


def test_missing_checkpoint_is_explained(tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_transfer_needs_both_splits_of_one_dataset(tmp_path, capsys):
    args = ["evaluate", "--checkpoint", str(tmp_path), "--test-data", str(tmp_path)]
    assert main(args) == 2
    assert "both --train-data and --test-data" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("statuses", "code"), [(["ERROR: X", "ERROR: Y"], 1), (["ERROR: X", "completed"], 0)]
)
def test_a_sweep_whose_every_trial_failed_exits_non_zero(statuses, code, capsys, monkeypatch):
    rows = [{"status": status} for status in statuses]
    monkeypatch.setattr("pipeline.tune.sweep.sweep", lambda *args, **kwargs: rows)
    assert main(["tune", "--space", "simclr", "--set", "run.root=/tmp/sweeps"]) == code
    err = capsys.readouterr().err
    assert ("all 2 trials failed" in err and "/tmp/sweeps/sweeps/" in err) == (code == 1)


def test_prepare_a_folder_then_reuse_it(ray_session, tmp_path, capsys):
    """prepare runs as a Ray Data job: on the session's shared Ray instance here."""
    for label in ("cat", "dog"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for index in range(3):
            Image.new("RGB", (12, 12), (index * 40, 0, 0)).save(
                tmp_path / "images" / label / f"{index}.png"
            )
    out = tmp_path / "shards"
    args = ["prepare", f"folder:{tmp_path / 'images'}", "--out", str(out)]
    assert main(args) == 0
    assert "train: 6 images in 1 shards, 0 skipped" in capsys.readouterr().out
    (out / "train" / "part-00000.parquet").touch()  # a rewrite would replace this file
    stamp = (out / "train" / "part-00000.parquet").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "train" / "part-00000.parquet").stat().st_mtime_ns == stamp
