"""The files ``export`` writes, one function per format.

- ``safetensors``: the backbone's ``state_dict`` under its own names (the torchvision or
  timm names for those backbones), with the run's facts as string metadata. It loads with
  ``strict=True`` into the same architecture (see the model card's "Load" section).
- ``torchscript``: :class:`~pipeline.export.encoder.EmbeddingModel` traced at the run's
  image size: [0, 1] images in, ``embed``'s L2-normalised features out.
- ``onnx``: the same graph through torch's ONNX exporter, with a dynamic batch axis
  (input ``images``, output ``embedding``).
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pipeline.data import locations

FORMATS = ("safetensors", "torchscript", "onnx")
FILES = {
    "safetensors": "backbone.safetensors",
    "torchscript": "encoder.torchscript.pt",
    "onnx": "encoder.onnx",
}


def write_safetensors(backbone: nn.Module, metadata: dict[str, str], out_dir: str) -> str:
    """The backbone's tensors (contiguous, as safetensors requires) with ``metadata``."""
    from safetensors.torch import save

    tensors = {key: value.contiguous() for key, value in backbone.state_dict().items()}
    location = locations.join(out_dir, FILES["safetensors"])
    locations.write_bytes(location, save(tensors, metadata=metadata))
    return location


def write_torchscript(model: nn.Module, example: torch.Tensor, out_dir: str) -> str:
    """``model`` traced on ``example`` (the shape the run trained at; any batch size)."""
    with warnings.catch_warnings():
        # Tracing is deprecated in favour of torch.export, but it is what TorchScript users load.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
    return _write_via_file(out_dir, FILES["torchscript"], lambda path: traced.save(str(path)))


def write_onnx(model: nn.Module, example: torch.Tensor, out_dir: str) -> str:
    """``model`` as ONNX (torch's exporter, built on torch.export), batch axis dynamic."""

    def export(path: Path) -> None:
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["images"],
            output_names=["embedding"],
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            dynamo=True,
            external_data=False,
            verbose=False,
        )

    return _write_via_file(out_dir, FILES["onnx"], export)


def _write_via_file(out_dir: str, name: str, write: Callable[[Path], object]) -> str:
    """Let ``write(path)`` write a local file, then copy it to ``out_dir`` (path or URI)."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / name
        write(path)
        location = locations.join(out_dir, name)
        locations.write_bytes(location, path.read_bytes())
    return location
