import pickle

import pytest
import torch
from safetensors.torch import save_file

from pipeline.config import ConfigError, load_config
from pipeline.train.backbone import check_backbone, read_backbone_weights
from pipeline.train.checkpoint import build_method_for
from ssl_models import build_backbone


def _small_cnn_weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    backbone, _ = build_backbone("small_cnn", width=0.5, in_channels=1)
    return {key: value.contiguous() for key, value in backbone.state_dict().items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_weights_file_starts_the_backbone_and_its_momentum_copy(tmp_path, suffix):
    weights = _small_cnn_weights(seed=7)
    path = tmp_path / f"encoder{suffix}"
    save_file(weights, path) if suffix == ".safetensors" else torch.save(weights, path)
    config = load_config(
        None,
        [
            "method.name=byol",
            "model.backbone=small_cnn",
            "model.width=0.5",
            f"model.pretrained={path}",
        ],
    )
    loaded = read_backbone_weights(str(path))
    method = build_method_for(config, 1, None, loaded)
    for key, value in weights.items():
        assert torch.equal(method.backbone.state_dict()[key], value)
        # BYOL's target network starts as a copy of the pretrained online backbone.
        assert torch.equal(method.target_backbone.state_dict()[key], value)
    check_backbone(config, channels=1, image_size=28)


def test_a_weights_file_in_object_storage_is_read(s3_bucket):
    from safetensors.torch import save

    from pipeline.data import locations

    weights = _small_cnn_weights(seed=5)
    uri = f"{s3_bucket}/encoders/small.safetensors"
    locations.write_bytes(uri, save(weights))
    loaded = read_backbone_weights(uri)
    assert loaded.source == uri and all(torch.equal(loaded.tensors[k], weights[k]) for k in weights)


def test_a_file_that_is_not_a_state_dict_is_named(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"epoch": 3, "state_dict": _small_cnn_weights(0)}, path)
    with pytest.raises(ValueError, match=r"model\.pt holds a dict, not a state_dict"):
        read_backbone_weights(str(path))
    code = tmp_path / "evil.pt"
    code.write_bytes(pickle.dumps(print))  # weights_only refuses to run a pickled callable
    with pytest.raises(ValueError, match="evil.pt is not a torch state_dict file"):
        read_backbone_weights(str(code))


def test_mismatched_weights_and_unusable_inputs_stop_before_ray(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file(_small_cnn_weights(0), path)
    config = load_config(None, ["model.backbone=resnet18", f"model.pretrained={path}"])
    with pytest.raises(ConfigError, match=r"'model\.pretrained'.*missing keys .*conv1\.weight"):
        check_backbone(config, channels=1, image_size=28)
    vit = load_config(
        None, ["model.backbone=torchvision:vit_b_16", "model.width=1", "model.small_images=false"]
    )
    with pytest.raises(ConfigError, match=r"'model\.backbone'.*cannot take the run's 1x28x28"):
        check_backbone(vit, channels=1, image_size=28)
