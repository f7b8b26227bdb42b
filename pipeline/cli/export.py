"""``export``: a run's encoder as safetensors, TorchScript or ONNX, with a model card."""

from __future__ import annotations

import argparse

from pipeline.cli.arguments import add_command

SUMMARY = "write a run's encoder as safetensors / TorchScript / ONNX files with a model card"
DESCRIPTION = """\
Takes the encoder out of the project's checkpoint format:
  safetensors  backbone.safetensors: the backbone's weights under its own names. A built-in
               ResNet at width 1 loads with strict=True into torchvision.models.resnet18/50
               (fc = Identity; with model.small_images, conv1 = 3x3 stride 1 and maxpool =
               Identity); a torchvision:/timm: backbone into that library's model.
  torchscript  encoder.torchscript.pt: [0, 1] images (N, C, H, W) -> the L2-normalised
               features `embed` writes (normalisation inside). Checked against the model.
  onnx         encoder.onnx: the same graph (input "images", output "embedding", any batch).
model_card.json and model_card.md go beside them: method, backbone, data, epochs, image
size, input normalisation, the run's evaluation rows, SHA-256 of each file, and the code
that loads each one. With run.trackers mlflow / wandb the card is logged to the run too.

In Python, without exporting:
  from pipeline import load_encoder
  model, preprocess = load_encoder("runs/fmnist-simclr-demo")
  features = model(preprocess(Image.open("shirt.png")).unsqueeze(0))

Examples:
  python -m pipeline export --checkpoint runs/fmnist-simclr-demo --out exported/
  python -m pipeline export --checkpoint s3://bucket/runs/big --format safetensors,onnx \\
      --out s3://bucket/models/big
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``export`` and its options."""
    parser = add_command(commands, "export", SUMMARY, DESCRIPTION)
    parser.add_argument(
        "--checkpoint", type=str, required=True, help="run or checkpoint directory (path or URI)"
    )
    parser.add_argument(
        "--format",
        type=str,
        default="safetensors,torchscript,onnx",
        help="comma-separated: safetensors, torchscript, onnx (default: all three)",
    )
    parser.add_argument("--out", type=str, required=True, help="output directory (path or URI)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Export, then print each file written."""
    from pipeline.export.export import export_run

    formats = [fmt.strip() for fmt in args.format.split(",") if fmt.strip()]
    result = export_run(args.checkpoint, formats, args.out)
    for fmt, location in result.files.items():
        print(f"{fmt}: {location}")
    print(f"model card: {', '.join(result.card_files)}")
    return 0
