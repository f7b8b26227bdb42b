"""The dense decoder: output shapes from any backbone's feature map, and it can fit a map."""

import torch

from ssl_models import build_backbone
from ssl_models.dense_decoder import DenseDecoder


def test_decodes_every_backbones_feature_map_to_the_requested_size():
    for name in ("small_cnn", "resnet18", "vit_tiny"):
        backbone, dim = build_backbone(name, width=0.25, in_channels=1)
        fmap = backbone.feature_map(torch.randn(2, 1, 28, 28))
        assert DenseDecoder(dim, 5)(fmap, (28, 28)).shape == (2, 5, 28, 28), name
        assert DenseDecoder(dim, 3, upsamplings=1)(fmap, (7, 7)).shape == (2, 3, 7, 7), name


def test_fits_a_fixed_image_from_a_feature_map():
    torch.manual_seed(0)
    decoder = DenseDecoder(8, 1, hidden=16)
    fmap, target = torch.randn(4, 8, 4, 4), torch.rand(4, 1, 28, 28)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        loss = torch.nn.functional.mse_loss(decoder(fmap, (28, 28)), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
