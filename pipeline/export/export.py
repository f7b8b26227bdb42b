"""``export``: a run's encoder as files that leave the project, with a model card.

The checkpoint's backbone goes out as safetensors, and its evaluation features (what
``embed`` writes) as TorchScript and ONNX graphs; ``model_card.json`` / ``.md`` describe them
(pipeline.export.card), and the run's MLflow / W&B runs get the card as artifacts. The
TorchScript file is loaded back and compared with the model before the card is written, so
an export that does not reproduce the encoder stops with an error instead of shipping.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.data import locations
from pipeline.eval.report import read_eval
from pipeline.export.card import ModelCard, add_file, build_card, write_card
from pipeline.export.encoder import EmbeddingModel, features_module
from pipeline.export.formats import FORMATS, write_onnx, write_safetensors, write_torchscript
from pipeline.train.checkpoint import find_checkpoint, method_from_checkpoint
from pipeline.train.trackers import log_model_card

TOLERANCE = 1e-4  # largest difference allowed between an exported graph and the model


@dataclass
class ExportResult:
    """What ``export`` wrote: a location per format, the card's files and the card."""

    files: dict[str, str]
    card_files: list[str]
    card: ModelCard


def export_run(run: str, formats: Sequence[str], out_dir: str) -> ExportResult:
    """Export the encoder of ``run`` (a run directory, checkpoint directory or file; path
    or URI) in ``formats`` into ``out_dir`` (path or URI), with its model card."""
    unknown = [fmt for fmt in formats if fmt not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"--format must name some of {list(FORMATS)}, got {list(formats)}")
    checkpoint = find_checkpoint(run)
    method, config, state = method_from_checkpoint(checkpoint)
    run_dir = locations.parent(checkpoint)
    card = build_card(
        checkpoint, config, state, method.backbone, method.feature_dim, _evaluation(run_dir)
    )
    locations.make_dirs(out_dir)
    model = EmbeddingModel(features_module(method), state.mean, state.std).eval()
    example = torch.rand(2, state.channels, state.image_size, state.image_size)
    files: dict[str, str] = {}
    for fmt in dict.fromkeys(formats):
        if fmt == "safetensors":
            files[fmt] = write_safetensors(method.backbone, _metadata(card), out_dir)
        elif fmt == "torchscript":
            files[fmt] = write_torchscript(model, example, out_dir)
            _check_torchscript(files[fmt], model, example)
        else:
            files[fmt] = write_onnx(model, example, out_dir)
        add_file(card, fmt, files[fmt])
    card_files = write_card(card, out_dir)
    log_model_card(run_dir, config, card_files)
    return ExportResult(files, card_files, card)


def _evaluation(run_dir: str) -> dict[str, Any]:
    """The run's eval.json, or nothing when it was not evaluated."""
    try:
        return read_eval(run_dir)
    except ValueError:
        return {}


def _metadata(card: ModelCard) -> dict[str, str]:
    """The safetensors header's metadata: strings only, so each fact as a string."""
    facts = {
        "method": card.method,
        "backbone": card.backbone["name"],
        "width": card.backbone["width"],
        "small_images": card.backbone["small_images"],
        "channels": card.input["channels"],
        "image_size": card.input["image_size"],
        "mean": card.input["mean"],
        "std": card.input["std"],
        "epochs": card.training["epochs"],
    }
    return {"format": "pt"} | {key: str(value) for key, value in facts.items()}


def _check_torchscript(location: str, model: torch.nn.Module, example: torch.Tensor) -> None:
    """The saved TorchScript graph reproduces ``model`` on ``example``, or a RuntimeError."""
    loaded = torch.jit.load(io.BytesIO(locations.read_bytes(location)))
    with torch.no_grad():
        difference = float((loaded(example) - model(example)).abs().max())
    if difference > TOLERANCE:
        raise RuntimeError(
            f"{location} differs from the model by {difference:.2e} (> {TOLERANCE}); the "
            "backbone's forward depends on something tracing cannot record"
        )
