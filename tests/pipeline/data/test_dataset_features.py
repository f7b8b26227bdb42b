"""Whole-dataset features for DeepCluster: every image once, in eval mode, at its slot."""

import torch
from torch import nn

from pipeline.data.dataset_features import dataset_features
from pipeline.data.ingest import ImageSpec, image_slots, normalize, read_decoded


def _backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )


def test_features_of_every_image_at_its_slot_in_eval_mode(ray_session, fmnist_small):
    spec, limit = ImageSpec(size=28, channels=1), 700
    mean, std = torch.tensor([0.3]), torch.tensor([0.35])
    backbone = _backbone().train()
    backbone[1].running_mean.fill_(0.2)  # eval mode must use these, and leave them alone
    slots = image_slots(fmnist_small["train"], limit)
    result = dataset_features(
        backbone,
        4,
        str(fmnist_small["train"]),
        spec,
        slots,
        mean,
        std,
        torch.device("cpu"),
        limit=limit,
        batch_size=128,
    )
    assert backbone.training and torch.all(backbone[1].running_mean == 0.2)
    assert result.features.shape == (limit, 4) and result.missing == 0
    assert sorted(result.slots.tolist()) == list(range(limit))
    decoded = read_decoded(fmnist_small["train"], spec, limit)
    with torch.no_grad():
        expected = backbone.eval()(normalize(torch.from_numpy(decoded.pixels), mean, std))
    by_slot = torch.empty_like(result.features)
    by_slot[result.slots] = result.features
    order = torch.tensor([slots[image_id] for image_id in decoded.ids])
    torch.testing.assert_close(by_slot[order], expected, atol=1e-5, rtol=1e-5)
