"""Checkpoint files keep every method's whole state (teachers, queues, banks) bit for bit
and load with torch.load(weights_only=True)."""

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.config import Config, from_dict
from pipeline.data.ingest import ViewPlan, views_on_device
from pipeline.train.checkpoint import (
    CHECKPOINT_FILE,
    CheckpointState,
    check_resumable,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from ssl_models import METHODS, Batch, build_method
from ssl_models.registry import method_params
from ssl_models.transforms.views import ViewRecipe

# Masked-image modelling drops or replaces a ViT's patch tokens: it needs a ViT backbone.
NEEDS_VIT = {"mae", "simmim"}


def _state(**fields) -> CheckpointState:
    """A checkpoint state with placeholder values for the fields a test does not set."""
    placeholders = {
        "model": {},
        "optimizer": {},
        "epoch": 0,
        "step": 0,
        "torch_rng": torch.get_rng_state(),
        "config": {},
        "channels": 1,
        "image_size": 28,
        "mean": [0.5],
        "std": [0.25],
        "metrics": {},
    }
    return CheckpointState(**(placeholders | fields))


def _fields(state: CheckpointState) -> dict:
    return {field.name: getattr(state, field.name) for field in dataclasses.fields(state)}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_state_round_trips_through_a_checkpoint_file(name, tmp_path):
    torch.manual_seed(0)
    backbone = "vit_tiny" if name in NEEDS_VIT else "small_cnn"
    all_options = method_params(name) | ({"queue_size": 16} if name == "moco_v2" else {})
    needs = METHODS[name].requirements(all_options)
    channels = needs.input_channels or 1
    build = {"backbone": backbone, "width": 0.25, "in_channels": channels, "num_images": 32}
    options = {"queue_size": 16} if name == "moco_v2" else {}
    method = build_method(name, **build, **options)
    # The views (and a pretext task's targets) as the data stage makes them.
    plan = ViewPlan((ViewRecipe.simclr(32),) * needs.global_views, needs.pretext)
    images = np.random.default_rng(0).integers(0, 256, (8, channels, 32, 32), dtype=np.uint8)
    gen = torch.Generator().manual_seed(0)
    uint8_views, targets = views_on_device({"image": images}, plan, torch.device("cpu"), gen)
    views = [view.float() / 255 for view in uint8_views]
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9)
    method(Batch(views, torch.arange(8), targets)).loss.backward()
    optimizer.step()
    method.after_optimizer_step(0, 10)  # moves teachers, queues, banks away from init

    save_checkpoint(tmp_path, _state(model=method.state_dict(), optimizer=optimizer.state_dict()))
    state = load_checkpoint(tmp_path)
    torch.manual_seed(1)  # a differently initialised copy
    restored = build_method(name, **build, **options)
    restored.load_state_dict(state.model)
    original = method.state_dict()
    assert original.keys() == restored.state_dict().keys()
    for key, value in restored.state_dict().items():
        assert torch.equal(value, original[key]), key
    assert not (tmp_path / "checkpoint.pt.tmp").exists()


def _with(config: Config, section: str, **values) -> Config:
    changed = config.to_dict()
    changed[section].update(values)
    return from_dict(changed)


def test_a_run_resumes_only_with_the_setup_that_wrote_it(tmp_path):
    config = from_dict({"run": {"name": "r"}, "method": {"name": "simclr"}})
    assert check_resumable(tmp_path, config) == 0  # no checkpoints yet: anything goes
    (tmp_path / "checkpoint_2026-01-01_00-00-00.000000").mkdir()
    save_checkpoint(
        tmp_path / "checkpoint_2026-01-01_00-00-00.000000",
        _state(config=config.to_dict(), epoch=3),
    )

    # May go on, from the 3 epochs done.
    assert check_resumable(tmp_path, _with(config, "train", epochs=50, base_lr=0.1)) == 3
    with pytest.raises(ValueError, match=r"train.optimizer: 'lars' -> 'sgd'.*new run.name"):
        check_resumable(tmp_path, _with(config, "train", optimizer="sgd"))
    with pytest.raises(ValueError, match=r"method: .*'simclr'.*'byol'"):
        check_resumable(tmp_path, _with(config, "method", name="byol"))


def test_a_checkpoint_cut_short_is_passed_over_for_the_one_before(tmp_path):
    older, newer = (tmp_path / f"checkpoint_2026-01-0{day}_00-00-00.000000" for day in (1, 2))
    for directory, epoch in ((older, 1), (newer, 2)):
        directory.mkdir()
        save_checkpoint(directory, _state(epoch=epoch, model={"weights": torch.arange(1000.0)}))
    assert latest_checkpoint(tmp_path) == str(newer)
    whole = (newer / "checkpoint.pt").read_bytes()
    (newer / "checkpoint.pt").write_bytes(whole[: len(whole) // 2])  # a crash mid-copy
    assert latest_checkpoint(tmp_path) == str(older)
    assert load_checkpoint(latest_checkpoint(tmp_path)).epoch == 1
    (older / "checkpoint.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in .* \(none is complete\)"):
        latest_checkpoint(tmp_path)


def test_checkpoints_in_object_storage_resolve_load_and_resume(s3_bucket, tmp_path):
    from pipeline.data import locations

    config = from_dict({"run": {"name": "r"}, "method": {"name": "simclr"}})
    run = f"{s3_bucket}/runs/r"
    assert check_resumable(run, config) == 0  # nothing there yet
    for day, epoch in ((1, 1), (2, 2), (3, 3)):
        save_checkpoint(tmp_path, _state(config=config.to_dict(), epoch=epoch))
        data = (tmp_path / "checkpoint.pt").read_bytes()
        if day == 3:
            data = data[: len(data) // 2]  # the newest was cut short while it was uploaded
        name = f"checkpoint_2026-01-0{day}_00-00-00.000000"
        locations.write_bytes(f"{run}/{name}/checkpoint.pt", data)
    locations.write_text(f"{run}/eval.json", "{}")  # other files of the run are ignored
    latest = latest_checkpoint(run)
    assert latest == f"{run}/checkpoint_2026-01-02_00-00-00.000000"
    assert load_checkpoint(latest).epoch == 2
    assert load_checkpoint(f"{latest}/checkpoint.pt").epoch == 2
    assert check_resumable(run, config) == 2
    with pytest.raises(ValueError, match=r"train.optimizer: 'lars' -> 'sgd'"):
        check_resumable(run, _with(config, "train", optimizer="sgd"))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(f"{run}/checkpoint_2026-01-09_00-00-00.000000")


def test_a_checkpoint_state_round_trips_and_is_a_plain_dict_on_disk(tmp_path):
    torch.manual_seed(0)
    state = _state(
        model={"w": torch.randn(3, 2)},
        optimizer={"state": {0: {"momentum_buffer": torch.randn(3, 2)}}, "param_groups": []},
        epoch=4,
        step=40,
        config=from_dict({"run": {"name": "r"}}).to_dict(),
        num_images=1000,
        metrics={"epoch": 4, "loss": 1.5},
        online_probe={"head": {"1.weight": torch.randn(10, 2)}},
    )
    save_checkpoint(tmp_path, state)
    loaded = load_checkpoint(tmp_path)
    assert _fields(loaded).keys() == _fields(state).keys()
    for name, value in _fields(state).items():
        if name in ("model", "optimizer", "torch_rng", "online_probe"):  # hold tensors
            torch.testing.assert_close(getattr(loaded, name), value, msg=name)
        else:
            assert getattr(loaded, name) == value, name
    # On disk the fields are a plain dict: what every saved run already holds.
    on_disk = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert type(on_disk) is dict and on_disk.keys() == _fields(state).keys()


def test_a_checkpoint_from_before_num_images_and_the_probe_still_loads(tmp_path):
    saved = vars(_state(epoch=2)).copy()
    del saved["num_images"], saved["online_probe"]  # early runs did not write them
    torch.save(saved, tmp_path / CHECKPOINT_FILE)
    state = load_checkpoint(tmp_path)
    assert state.epoch == 2 and state.num_images is None and state.online_probe is None
