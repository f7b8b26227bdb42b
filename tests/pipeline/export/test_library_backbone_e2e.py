"""A user's whole journey with a timm ResNet through Ray: start it from a weights file, train
SimCLR one epoch with 2 workers, export it in every format, and load it back."""

import json
import math

import pytest
import timm
import torch
from safetensors.torch import save_file

from pipeline import load_encoder
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.train.driver import pretrain


@pytest.mark.slow
def test_a_timm_resnet_starts_from_weights_trains_and_is_exported(
    ray_session, fmnist_small, tmp_path
):
    # Weights a user brings: timm's own test_resnet (grey input), classifier included.
    torch.manual_seed(3)
    brought = timm.create_model("test_resnet", pretrained=False, in_chans=1)
    weights = tmp_path / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in brought.state_dict().items()}, weights)
    config = load_config(
        None,
        [
            f"run.root={tmp_path}",
            "run.name=timm-simclr",
            f"data.train={fmnist_small['train']}",
            f"data.eval_train={fmnist_small['train']}",
            f"data.eval_test={fmnist_small['test']}",
            "data.limit=1024",
            "model.backbone=timm:test_resnet",
            "model.width=1",
            f"model.pretrained={weights}",
            "train.batch_size=64",
            "train.epochs=1",
            "train.warmup_epochs=0.1",
            "train.online_knn_bank=0",
        ],
    )
    metrics = pretrain(config).metrics
    assert metrics["step"] == 16 and math.isfinite(metrics["loss"])
    assert metrics["loss_last_steps"] < metrics["loss_first_steps"]

    run_dir = tmp_path / "timm-simclr"
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(out)]) == 0
    card = json.loads((out / "model_card.json").read_text())
    assert card["backbone"]["started_from"] == str(weights)
    assert card["backbone"]["architecture"] == "timm.models.resnet.ResNet"

    model, preprocess = load_encoder(str(run_dir))
    assert type(model).__module__ == "timm.models.resnet"
    # Trained: the weights moved away from the file they started from.
    assert not torch.equal(model.layer1[0].conv1.weight, brought.layer1[0].conv1.weight)
    scripted = torch.jit.load(str(out / "encoder.torchscript.pt"))
    images = torch.rand(3, 1, 28, 28)
    mean, std = torch.tensor(preprocess.mean), torch.tensor(preprocess.std)
    with torch.no_grad():
        direct = torch.nn.functional.normalize(model((images - mean) / std), dim=1)
        assert torch.allclose(scripted(images), direct, atol=1e-4)
