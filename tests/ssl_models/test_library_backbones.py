import pytest
import timm
import torch
import torchvision
from torch import nn

from ssl_models import build_backbone
from ssl_models.backbones import backbone_kind, feature_map
from ssl_models.library_backbones import TimmViTSteps, timm_vit_steps
from ssl_models.method import Batch
from ssl_models.pretrained import BackboneWeights, WeightsMismatch, load_backbone_weights
from ssl_models.registry import build_method


@pytest.mark.parametrize(
    ("name", "dim", "map_shape"),
    [
        ("timm:resnet18", 512, (2, 512, 4, 4)),  # 3x3 stride-1 stem, no max-pool: /8
        ("timm:convnext_atto", 320, (2, 320, 4, 4)),  # stride-1 stem instead of patchify /4
        ("timm:vit_tiny_patch16_224", 192, (2, 192, 8, 8)),  # 4 px patches
        ("torchvision:resnet18", 512, (2, 512, 4, 4)),
        ("torchvision:convnext_tiny", 768, (2, 768, 4, 4)),
    ],
)
def test_library_models_give_pooled_features_and_a_small_image_map(name, dim, map_shape):
    model, feature_dim = build_backbone(name, in_channels=1, small_images=True)
    images = torch.randn(2, 1, 32, 32)
    model.eval()
    with torch.no_grad():
        assert feature_dim == dim
        assert model(images).shape == (2, dim)
        assert feature_map(model, images).shape == map_shape
    assert type(model).__module__.split(".")[0] == name.split(":")[0]  # the library's own class


def test_torchvision_pre_logits_are_the_input_of_the_removed_classifier():
    torch.manual_seed(0)
    model, dim = build_backbone("torchvision:mobilenet_v3_small", small_images=False)
    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v3_small()
    images = torch.randn(2, 3, 64, 64)
    model.eval(), reference.eval()
    with torch.no_grad():
        # The last linear layer maps the features to logits; the hidden one stays (pre_logits).
        assert torch.allclose(reference.classifier[3](model(images)), reference(images), atol=1e-5)
    assert dim == 1024 and model.dropped_head == "classifier.3"


def test_a_model_whose_stem_cannot_be_adapted_is_refused_and_kinds_are_told():
    with pytest.raises(ValueError, match=r"cannot adapt the stem of timm:efficientnet_b0"):
        build_backbone("timm:efficientnet_b0", small_images=True)
    with pytest.raises(ValueError, match="width must be 1"):
        build_backbone("timm:resnet18", width=0.5)
    assert backbone_kind("timm:efficientnet_b0", small_images=False) == "cnn"
    assert backbone_kind("timm:vit_tiny_patch16_224") == "vit"
    assert backbone_kind("torchvision:vit_b_16", small_images=False) == "other"
    assert backbone_kind("resnet18") == "cnn" and backbone_kind("vit_small") == "vit"


def test_timm_vit_steps_reproduce_timms_own_forward():
    vit, _ = build_backbone("timm:vit_tiny_patch16_224", in_channels=1, small_images=True)
    steps = timm_vit_steps(vit)
    assert isinstance(steps, TimmViTSteps) and steps.patch_size == 4
    vit.eval()
    for side in (32, 16):  # the reference grid, and a resampled one
        images = torch.randn(2, 1, side, side)
        with torch.no_grad():
            ours = steps.encode(steps.patch_tokens(images))
            assert torch.allclose(ours, vit.forward_features(images), atol=1e-5)
            assert torch.allclose(ours[:, 0], vit(images), atol=1e-5)


@pytest.mark.parametrize("method", ["mae", "simmim"])
def test_masked_image_methods_train_a_timm_vit(method):
    torch.manual_seed(0)
    model = build_method(
        method, backbone="timm:vit_tiny_patch16_224", width=1.0, in_channels=1, small_images=True
    )
    output = model(Batch(views=[torch.rand(4, 1, 28, 28)]))
    output.loss.backward()
    assert torch.isfinite(output.loss)
    assert model.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_pretrained_weights_load_strictly_and_skip_only_the_dropped_classifier():
    reference = torchvision.models.resnet18()  # a torchvision checkpoint, classifier included
    backbone, _ = build_backbone("resnet18", width=1.0, small_images=False)
    skipped = load_backbone_weights(backbone, BackboneWeights(reference.state_dict(), "r18.pt"))
    assert skipped == ["fc.weight", "fc.bias"]
    assert torch.equal(backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)

    timm_model = timm.create_model("resnet18", pretrained=False)
    ours, _ = build_backbone("timm:resnet18", small_images=False)
    assert load_backbone_weights(ours, BackboneWeights(timm_model.state_dict(), "t.pt")) == [
        "fc.weight",
        "fc.bias",
    ]


def test_mismatched_weights_list_every_missing_unexpected_and_misshapen_key():
    backbone, _ = build_backbone("small_cnn", width=0.5, in_channels=1)
    weights = dict(backbone.state_dict())
    del weights["features.0.weight"]
    weights["extra.bias"] = torch.zeros(3)
    weights["features.1.weight"] = torch.zeros(7)
    with pytest.raises(WeightsMismatch) as error:
        load_backbone_weights(backbone, BackboneWeights(weights, "s3://b/w.safetensors"))
    message = str(error.value)
    assert "s3://b/w.safetensors" in message and "SmallCNN" in message
    assert "missing keys (1): features.0.weight" in message
    assert "unexpected keys (1): extra.bias" in message
    assert "features.1.weight: file (7,), backbone (16,)" in message
    assert isinstance(backbone.features[0], nn.Conv2d)
