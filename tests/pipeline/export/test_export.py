"""Export round trips without Ray: the safetensors backbone loads with strict=True into the
architecture the model card names (by running the card's own load code), TorchScript and
ONNX give embed's embeddings within 1e-4, and load_encoder's model and preprocessing give
the trained backbone's features of a PIL image."""

import io
import json
import os

import numpy as np
import onnxruntime
import pytest
import torch
import torchvision
from PIL import Image

from pipeline.config import from_dict
from pipeline.data.image_features import extract_features
from pipeline.eval.report import write_eval
from pipeline.export.encoder import load_encoder
from pipeline.export.export import export_run
from pipeline.train.checkpoint import CheckpointState, build_method_for, save_checkpoint

MEAN, STD = 0.3, 0.35


def _checkpoint(root, method: str, model: dict, channels: int, size: int) -> str:
    """A run directory holding one checkpoint of ``method`` on ``model``, trained weights
    stood in for by a random draw (export is about the weights' journey, not their value)."""
    config = from_dict({"run": {"name": "r"}, "method": {"name": method}, "model": model})
    torch.manual_seed(1)
    built = build_method_for(config, channels, num_images=64)
    for buffer in built.buffers():  # BN statistics that are not the init's 0 / 1
        if buffer.dtype.is_floating_point:
            buffer.uniform_(0.5, 1.5)
    run_dir = root / "runs" / "r"
    directory = run_dir / "checkpoint_000000"
    directory.mkdir(parents=True)
    save_checkpoint(
        directory,
        CheckpointState(
            model=built.state_dict(),
            optimizer={},
            epoch=3,
            step=30,
            torch_rng=torch.get_rng_state(),
            config=config.to_dict(),
            channels=channels,
            image_size=size,
            num_images=64,
            mean=[MEAN] * channels,
            std=[STD] * channels,
            metrics={},
        ),
    )
    return str(run_dir)


CASES = {
    # name: (method, model section, channels, image size, class the card's code builds);
    # MobileNetV3 skips ONNX, whose export of it alone takes 10 s.
    "builtin_resnet18": (
        "simclr",
        {"backbone": "resnet18", "width": 1.0},
        1,
        28,
        torchvision.models.ResNet,
    ),
    "timm_resnet": (
        "simclr",
        {"backbone": "timm:test_resnet", "width": 1.0, "small_images": False},
        3,
        32,
        None,
    ),
    "timm_vit": ("mae", {"backbone": "timm:test_vit", "width": 1.0}, 1, 28, None),
    "torchvision_mobilenet": (
        "byol",
        {"backbone": "torchvision:mobilenet_v3_small", "width": 1.0, "small_images": False},
        3,
        32,
        torchvision.models.MobileNetV3,
    ),
    "cpc_small_cnn": ("cpc", {"backbone": "small_cnn", "width": 0.25}, 1, 28, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_format_reproduces_the_encoder(case, tmp_path):
    method, model, channels, size, expected_class = CASES[case]
    run_dir = _checkpoint(tmp_path, method, model, channels, size)
    write_eval(run_dir, {"protocols": {"knn": {"top1": 0.5}}, "method": method, "epochs": 3})
    out = tmp_path / "exported"
    formats = ["safetensors", "torchscript"] + ([] if "mobilenet" in case else ["onnx"])
    result = export_run(run_dir, formats, str(out))

    trained, preprocess = load_encoder(run_dir)
    pixels = np.random.default_rng(0).integers(0, 256, (5, channels, size, size), np.uint8)
    normalised = (torch.from_numpy(pixels).float() / 255 - MEAN) / STD
    with torch.no_grad():
        backbone_features = trained(normalised)

    # safetensors: the card's load code, run as written, builds the architecture and loads
    # the file with strict=True; it computes the trained backbone's features.
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(out)
    try:
        exec(result.card.load["safetensors"], namespace)
    finally:
        os.chdir(cwd)
    rebuilt = namespace["model"].eval()
    if expected_class is not None:
        assert type(rebuilt) is expected_class
    with torch.no_grad():
        assert torch.allclose(rebuilt(normalised), backbone_features, atol=1e-5)

    # TorchScript and ONNX: embed's L2-normalised features from [0, 1] images.
    from pipeline.train.checkpoint import method_from_checkpoint

    full, _, state = method_from_checkpoint(f"{run_dir}/checkpoint_000000")
    expected = extract_features(
        full.features, pixels, torch.tensor(state.mean), torch.tensor(state.std)
    )
    scaled = torch.from_numpy(pixels).float() / 255
    scripted = torch.jit.load(str(out / "encoder.torchscript.pt"))
    assert (scripted(scaled) - expected).abs().max() < 1e-4
    if "onnx" in formats:
        session = onnxruntime.InferenceSession(str(out / "encoder.onnx"))
        (onnx_out,) = session.run(None, {"images": scaled.numpy()})
        assert np.abs(onnx_out - expected.numpy()).max() < 1e-4

    card = json.loads((out / "model_card.json").read_text())
    assert card["method"] == method and card["backbone"]["name"] == model["backbone"]
    assert card["training"]["epochs"] == 3 and card["input"]["image_size"] == size
    assert card["input"]["mean"] == [MEAN] * channels
    assert card["evaluation"]["protocols"]["knn"]["top1"] == 0.5
    assert set(card["files"]) == set(formats)
    assert "| knn | 0.5000 |" in (out / "model_card.md").read_text()


def test_load_encoder_preprocesses_a_pil_image_as_the_data_stage_decodes_it(tmp_path):
    run_dir = _checkpoint(tmp_path, "simclr", {"backbone": "resnet18", "width": 1.0}, 1, 28)
    model, preprocess = load_encoder(run_dir)
    assert isinstance(model, torchvision.models.ResNet) and not model.training
    # A 40x30 RGB picture: made grey and fitted (resize + centre crop) to 28x28.
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 40, 3), np.uint8))
    tensor = preprocess(picture)
    assert tensor.shape == (1, 28, 28)
    fitted = np.asarray(
        Image.open(io.BytesIO(_png(picture))).convert("L").resize((37, 28), Image.BICUBIC)
    )
    assert abs(float(tensor.mean()) - (fitted.mean() / 255 - MEAN) / STD) < 0.05
    with torch.no_grad():
        assert model(tensor.unsqueeze(0)).shape == (1, 512)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_unknown_formats_are_refused(tmp_path):
    run_dir = _checkpoint(tmp_path, "simclr", {"backbone": "small_cnn"}, 1, 28)
    with pytest.raises(ValueError, match=r"--format must name some of .*'pdf'"):
        export_run(run_dir, ["pdf"], str(tmp_path / "out"))
