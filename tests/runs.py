"""Run directories for tests that read a checkpoint but need no training."""

from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.data.ingest import ImageSpec, channel_stats, read_decoded
from pipeline.train.checkpoint import CheckpointState, build_method_for, save_checkpoint


def write_untrained_run(fmnist_small: dict[str, Path], run: Path, method: str = "simclr") -> Path:
    """A run directory holding one checkpoint of ``method`` on a width-0.25 small CNN, written
    directly with seeded random weights (as if after 3 epochs): what evaluation and the
    benchmarks read, without a training run's Ray Train start-up."""
    config = load_config(
        None,
        [
            f"run.root={run.parent}",
            f"run.name={run.name}",
            f"data.train={fmnist_small['train']}",
            f"data.eval_train={fmnist_small['train']}",
            f"data.eval_test={fmnist_small['test']}",
            "model.backbone=small_cnn",
            "model.width=0.25",
            f"method.name={method}",
        ],
    )
    torch.manual_seed(1)
    method_module = build_method_for(config, channels=1, num_images=2048)
    mean, std = channel_stats(read_decoded(fmnist_small["train"], ImageSpec(28, 1), 256).pixels)
    state = CheckpointState(
        model=method_module.state_dict(),
        epoch=3,
        config=config.to_dict(),
        channels=1,
        image_size=28,
        num_images=2048,
        mean=mean,
        std=std,
        optimizer={},
        step=0,
        torch_rng=torch.get_rng_state(),
        metrics={},
    )
    checkpoint = run / "checkpoint_2026-01-01_00-00-00.000000"
    checkpoint.mkdir(parents=True)
    save_checkpoint(checkpoint, state)
    return run
