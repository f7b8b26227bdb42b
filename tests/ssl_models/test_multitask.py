"""Multi-task: tasks share the backbone, each gets its own views and targets, loss = sum."""

import pytest
import torch

from ssl_models.method import Batch
from ssl_models.methods.denoising_ae import DenoisingAutoencoder
from ssl_models.methods.multitask import MultiTask
from ssl_models.methods.rotation import RotNet
from ssl_models.registry import build_method, method_params
from ssl_models.transforms.multitask import TaskViews
from tests.ssl_models.helpers import tiny_backbone, validate_options

TASKS = ["rotation", "denoising_ae", "simclr"]


def _options(**extra) -> dict:
    return method_params("multitask") | {"tasks": TASKS} | extra


def _multitask(**options) -> MultiTask:
    backbone, dim = tiny_backbone()
    return MultiTask(backbone, dim, 16, tasks=TASKS, **options)


def _columns(n: int = 4, size: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    views = [torch.randint(0, 256, (n, 1, size, size), generator=gen).byte() for _ in range(4)]
    return MultiTask.requirements(_options()).pretext(views, gen)


def test_each_task_gets_its_share_of_views_numbered_in_order():
    assert MultiTask.requirements(_options()).global_views == 1 + 1 + 2
    gen = torch.Generator().manual_seed(0)
    views = [torch.full((3, 1, 8, 8), i, dtype=torch.uint8) for i in range(4)]
    columns = MultiTask.requirements(_options()).pretext(views, gen)
    assert sorted(columns) == [
        "target_denoising_ae__corrupted",
        "target_rotation__rotation",
        "target_views_per_task",
        "view_0",
        "view_1",
        "view_2",
        "view_3",
        "view_4",
    ]
    assert columns["target_views_per_task"].tolist() == [[1, 2, 2]] * 3
    assert columns["view_0"].shape == (3, 4, 1, 8, 8) and torch.all(columns["view_0"] == 0)
    assert torch.all(columns["view_2"] == 1)  # the denoising task's clean view is its own
    assert torch.all(columns["view_3"] == 2) and torch.all(columns["view_4"] == 3)  # SimCLR's
    assert isinstance(MultiTask.requirements(_options()).pretext, TaskViews)


def test_loss_is_the_weighted_sum_of_the_tasks_losses_on_one_shared_backbone():
    model = _multitask(weights=[0.5, 2.0, 1.0])
    for task in model.tasks.values():
        assert task.backbone is model.backbone
    columns = _columns()
    counts = columns["target_views_per_task"]
    views = [columns[f"view_{i}"].float() / 255 for i in range(5)]
    targets = {k.removeprefix("target_"): v for k, v in columns.items() if k.startswith("target_")}
    torch.manual_seed(1)
    out = model(Batch(views, torch.arange(4), targets))
    assert counts[0].tolist() == [1, 2, 2]
    torch.manual_seed(1)
    rotation = model.tasks["rotation"](
        Batch(views[:1], targets={"rotation": targets["rotation__rotation"]})
    )
    denoising = model.tasks["denoising_ae"](
        Batch(views[1:3], targets={"corrupted": targets["denoising_ae__corrupted"]})
    )
    simclr = model.tasks["simclr"](Batch(views[3:5]))
    expected = 0.5 * rotation.loss + 2.0 * denoising.loss + simclr.loss
    torch.testing.assert_close(out.loss, expected)
    assert out.logs["rotation/pretext_accuracy"] == rotation.logs["pretext_accuracy"]
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name


def test_every_parameter_is_in_exactly_one_group():
    model = _multitask()
    grouped = [id(p) for group in model.parameter_groups(1e-4) for p in group["params"]]
    assert len(grouped) == len(set(grouped)) == len(list(model.parameters()))


def test_options_reach_the_tasks_and_bad_ones_are_refused():
    backbone, dim = tiny_backbone()
    model = MultiTask(
        backbone,
        dim,
        16,
        tasks=["rotation", "denoising_ae"],
        task_options={"denoising_ae": {"noise_level": 0.4}},
    )
    assert isinstance(model.tasks["rotation"], RotNet)
    assert isinstance(model.tasks["denoising_ae"], DenoisingAutoencoder)
    transform = MultiTask.requirements(
        _options(tasks=["denoising_ae"], task_options={"denoising_ae": {"noise_level": 0.4}})
    ).pretext
    assert transform.transforms[0].noise_level == 0.4
    for bad, message in (
        ({"tasks": ["rotation", "nope"]}, "unknown tasks"),
        ({"tasks": ["multitask"]}, "unknown tasks"),
        ({"tasks": ["rotation", "rotation"]}, "distinct"),
        ({"tasks": ["rotation"], "weights": [1.0, 2.0]}, "weights"),
        ({"tasks": ["rotation"], "task_options": {"jigsaw": {}}}, "task_options"),
    ):
        with pytest.raises(ValueError, match=message):
            validate_options(MultiTask, **bad)
    built = build_method(
        "multitask",
        backbone="small_cnn",
        width=0.25,
        in_channels=1,
        num_images=16,
        tasks=["rotation", "jigsaw"],
    )
    assert list(built.tasks) == ["rotation", "jigsaw"]
