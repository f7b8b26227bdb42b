"""The model card ``export`` writes beside the weights: ``model_card.json`` and ``.md``.

It says what the encoder is (method, backbone, feature size), what it learned from (data,
image size, epochs), how to feed it (channels, size, scale and normalisation), how good it
is (the run's eval.json rows, when it was evaluated), which files hold it (with SHA-256), and
the code that loads each file, which the tests run as written.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from pipeline.config import Config
from pipeline.data import locations
from pipeline.train.checkpoint import CheckpointState
from ssl_models.backbones import backbone_kind, build_backbone
from ssl_models.library_backbones import TIMM, TORCHVISION, split_name

CARD_JSON = "model_card.json"
CARD_MARKDOWN = "model_card.md"
_TORCHVISION_RESNETS = ("resnet18", "resnet50")  # built-ins that are torchvision's at width 1


@dataclass
class ModelCard:
    """What a card holds; ``to_json`` / ``to_markdown`` render it."""

    run: str
    checkpoint: str
    method: str
    method_options: dict[str, Any]
    backbone: dict[str, Any]
    data: dict[str, Any]
    training: dict[str, Any]
    input: dict[str, Any]
    evaluation: dict[str, Any]
    files: dict[str, dict[str, str]] = field(default_factory=dict)
    load: dict[str, str] = field(default_factory=dict)
    exported_at: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    )

    def to_json(self) -> str:
        """The card as indented JSON."""
        return json.dumps(asdict(self), indent=2, default=str)

    def to_markdown(self) -> str:
        """The card as a Markdown page."""
        lines = [
            f"# {self.run}: {self.method} on {self.backbone['name']}",
            "",
            f"Exported {self.exported_at} from `{self.checkpoint}`.",
            "",
            "| | |",
            "|---|---|",
            *(
                f"| {section} | {_inline(values)} |"
                for section, values in (
                    ("backbone", self.backbone),
                    ("data", self.data),
                    ("training", self.training),
                    ("input", self.input),
                    ("method options", self.method_options),
                )
            ),
            "",
            "## Evaluation",
            "",
            *_evaluation_lines(self.evaluation),
            "",
            "## Files",
            "",
            *(f"- `{f['file']}` ({fmt}), sha256 `{f['sha256']}`" for fmt, f in self.files.items()),
        ]
        for fmt, code in self.load.items():
            lines += ["", f"## Load: {fmt}", "", "```python", code.rstrip(), "```"]
        return "\n".join(lines) + "\n"


def _inline(values: dict[str, Any]) -> str:
    return ", ".join(f"{key}: {value}" for key, value in values.items()) or "-"


def _evaluation_lines(evaluation: dict[str, Any]) -> list[str]:
    protocols = evaluation.get("protocols", {})
    if not protocols:
        return ["Not evaluated yet: run `python -m pipeline evaluate --checkpoint RUN`."]
    rows = [f"| {name} | {metrics['top1']:.4f} |" for name, metrics in protocols.items()]
    return ["| protocol | top-1 |", "|---|---|", *rows]


def build_card(
    checkpoint: str,
    config: Config,
    state: CheckpointState,
    backbone: nn.Module,
    feature_dim: int,
    evaluation: dict[str, Any],
) -> ModelCard:
    """The card of ``checkpoint``, whose trained ``backbone`` gives ``feature_dim`` features
    (files and load code are added as they are written)."""
    model = config.model
    return ModelCard(
        run=config.run.name,
        checkpoint=checkpoint,
        method=config.method_name,
        method_options=config.method_kwargs,
        backbone={
            "name": model.backbone,
            "width": model.width,
            "small_images": model.small_images,
            "feature_dim": feature_dim,
            "kind": backbone_kind(model.backbone, model.small_images),
            "architecture": f"{type(backbone).__module__}.{type(backbone).__name__}",
            "dropped_head": getattr(backbone, "dropped_head", ""),
            # Whether the method changed the backbone's layers (CPC: norms), so that only the
            # method rebuilds it.
            "changed_by_method": _layer_types(backbone)
            != _layer_types(
                build_backbone(
                    model.backbone,
                    width=model.width,
                    in_channels=state.channels,
                    small_images=model.small_images,
                )[0]
            ),
            "started_from": model.pretrained or "random initialisation",
        },
        data={"train": config.data.train, "images": state.num_images},
        training={
            "epochs": state.epoch,
            "steps": state.step,
            "batch_size": config.train.batch_size,
            "optimizer": config.train.optimizer,
            "base_lr": config.train.base_lr,
        },
        input={
            "layout": "N x C x H x W, float32",
            "channels": state.channels,
            "image_size": state.image_size,
            "scale": "pixel / 255, in [0, 1]",
            "mean": state.mean,
            "std": state.std,
            "note": "safetensors: normalise (x - mean) / std first; TorchScript / ONNX do it",
        },
        evaluation=evaluation,
    )


def _layer_types(module: nn.Module) -> list[str]:
    return [type(layer).__name__ for layer in module.modules()]


def add_file(card: ModelCard, fmt: str, location: str) -> None:
    """Record an exported file (its name and SHA-256) and the code that loads it."""
    digest = hashlib.sha256(locations.read_bytes(location)).hexdigest()
    name = locations.name(location)
    card.files[fmt] = {"file": name, "sha256": digest}
    card.load[fmt] = _load_code(card, fmt, name)


def _load_code(card: ModelCard, fmt: str, name: str) -> str:
    if fmt == "torchscript":
        return f'import torch\nmodel = torch.jit.load("{name}")  # [0, 1] images -> embeddings\n'
    if fmt == "onnx":
        return (
            "import onnxruntime\n"
            f'session = onnxruntime.InferenceSession("{name}")\n'
            'embedding = session.run(None, {"images": images})[0]  # [0, 1] float32 NCHW\n'
        )
    return safetensors_load_code(card, name)


def safetensors_load_code(card: ModelCard, name: str) -> str:
    """Code that builds the backbone's architecture and loads the file with strict=True: the
    library's own constructor where the backbone is the library's model as built there,
    else ``ssl_models.build_backbone`` (the same class with its adapted stem)."""
    backbone, channels = card.backbone, card.input["channels"]
    arch, small = backbone["name"], backbone["small_images"]
    library = split_name(arch)
    if backbone["changed_by_method"]:
        build = _method_backbone(card)
    elif arch in _TORCHVISION_RESNETS and backbone["width"] == 1.0:
        build = _torchvision_resnet(arch, channels, small)
    elif library is not None and library[0] == TIMM and (backbone["kind"] == "vit" or not small):
        vit = ", dynamic_img_size=True" if backbone["kind"] == "vit" else ""
        patches = ", patch_size=4, img_size=32" if vit and small else ""
        build = (
            f'import timm\nmodel = timm.create_model("{library[1]}", pretrained=False, '
            f"num_classes=0, in_chans={channels}{vit}{patches})\n"
        )
    elif library is not None and library[0] == TORCHVISION and not small and channels == 3:
        parent, _, child = backbone["dropped_head"].rpartition(".")
        target = f'model.get_submodule("{parent}")' if parent else "model"
        build = (
            f'import torchvision\nmodel = torchvision.models.get_model("{library[1]}")\n'
            f'setattr({target}, "{child}", torch.nn.Identity())  # features, not logits\n'
        )
    else:
        build = (
            "from ssl_models import build_backbone  # this project's package\n"
            f'model, _ = build_backbone("{arch}", width={backbone["width"]}, '
            f"in_channels={channels}, small_images={small})\n"
        )
    return (
        "import torch\nfrom safetensors.torch import load_file\n"
        f'{build}model.load_state_dict(load_file("{name}"), strict=True)\n'
    )


def _method_backbone(card: ModelCard) -> str:
    """The method's own backbone, for methods that change its layers (CPC's norms)."""
    backbone = card.backbone
    options = "".join(f", {key}={value!r}" for key, value in card.method_options.items())
    return (
        "from ssl_models import build_method  # this project's package\n"
        f'model = build_method("{card.method}", backbone="{backbone["name"]}", '
        f"width={backbone['width']}, in_channels={card.input['channels']}, "
        f"small_images={backbone['small_images']}, num_images={card.data['images']}"
        f"{options}).backbone\n"
    )


def _torchvision_resnet(arch: str, channels: int, small: bool) -> str:
    """A built-in ResNet at width 1 is torchvision's, less the classifier, stem documented."""
    if small:
        stem = (
            f"model.conv1 = torch.nn.Conv2d({channels}, 64, 3, 1, 1, bias=False)"
            "  # small-image stem\nmodel.maxpool = torch.nn.Identity()\n"
        )
    elif channels != 3:
        stem = f"model.conv1 = torch.nn.Conv2d({channels}, 64, 7, 2, 3, bias=False)\n"
    else:
        stem = ""
    return (
        f"import torchvision\nmodel = torchvision.models.{arch}()\n"
        f"model.fc = torch.nn.Identity()  # features, not logits\n{stem}"
    )


def write_card(card: ModelCard, out_dir: str) -> list[str]:
    """Write the card as JSON and Markdown into ``out_dir``; their locations."""
    json_file = locations.join(out_dir, CARD_JSON)
    markdown_file = locations.join(out_dir, CARD_MARKDOWN)
    locations.write_text(json_file, card.to_json())
    locations.write_text(markdown_file, card.to_markdown())
    return [json_file, markdown_file]
