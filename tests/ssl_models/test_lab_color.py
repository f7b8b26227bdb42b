"""Lab colour: reference conversions, the in-gamut ab bins, soft encoding and the class
rebalancing weights of colorization, each against values worked out by hand."""

import math

import pytest
import torch

from ssl_models.lab_color import (
    ab_bins,
    rebalancing_weights,
    smoothed_distribution,
    soft_encode,
    srgb_to_lab,
)

# sRGB (uint8) -> CIE Lab (D65): published reference values (e.g. Lindbloom's calculator).
REFERENCE = [
    ((255, 255, 255), (100.0, 0.0, 0.0)),
    ((0, 0, 0), (0.0, 0.0, 0.0)),
    ((128, 128, 128), (53.585, 0.0, 0.0)),
    ((255, 0, 0), (53.2408, 80.0925, 67.2032)),
    ((0, 255, 0), (87.7347, -86.1827, 83.1793)),
    ((0, 0, 255), (32.2970, 79.1875, -107.8602)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_srgb_to_lab_matches_reference_values(dtype):
    rgb = torch.tensor([c for c, _ in REFERENCE], dtype=dtype).T.reshape(1, 3, 1, -1) / 255
    lab = srgb_to_lab(rgb)
    assert lab.shape == (1, 3, 1, len(REFERENCE)) and lab.dtype == dtype
    expected = torch.tensor([v for _, v in REFERENCE], dtype=dtype).T.reshape(1, 3, 1, -1)
    assert torch.allclose(lab, expected, atol=2e-3)


def test_srgb_to_lab_uses_the_linear_segment_near_black_and_checks_channels():
    # (1, 1, 1) / 255 is below the sRGB and CIE thresholds: both linear pieces, by hand.
    y = (1 / 255) / 12.92
    expected_l = 116 * (y / (3 * (6 / 29) ** 2) + 4 / 29) - 16
    lab = srgb_to_lab(torch.full((3, 1, 1), 1 / 255, dtype=torch.float64))
    assert lab[0].item() == pytest.approx(expected_l, abs=1e-9)
    assert lab[1:].abs().max().item() < 1e-9
    with pytest.raises(ValueError, match="3 channels"):
        srgb_to_lab(torch.rand(2, 1, 4, 4))


def test_ab_bins_are_the_in_gamut_grid_cells():
    bins = ab_bins()
    assert bins.shape == (261, 2)  # the paper's official set has 313, see the module docstring
    assert torch.equal(bins, torch.round(bins / 10) * 10)  # centres on multiples of 10
    assert bins[:, 0].min() == -90 and bins[:, 0].max() == 100
    assert bins[:, 1].min() == -110 and bins[:, 1].max() == 90
    keys = (bins[:, 0] * 1000 + bins[:, 1]).tolist()
    assert keys == sorted(keys) and len(set(keys)) == 261  # sorted by a, then b, unique
    assert [0.0, 0.0] in bins.tolist()
    bins[0] = 12345.0  # a copy: the cached set is untouched
    assert torch.equal(ab_bins()[1:], bins[1:]) and ab_bins()[0, 0] == -90


def test_every_uint8_colour_falls_into_a_bin():
    g = torch.Generator().manual_seed(0)
    colours = torch.randint(0, 256, (3, 1, 100_000), generator=g).float() / 255
    corners = torch.tensor([[0, 0, 255, 255], [0, 255, 0, 255], [255, 0, 0, 255]]) / 255
    colours = torch.cat([colours, corners.float().unsqueeze(1)], dim=2)
    cells = torch.round(srgb_to_lab(colours)[1:].reshape(2, -1).T / 10) * 10
    bins = ab_bins()
    assert (cells[:, None, :] == bins[None]).all(-1).any(-1).all()


def test_soft_encoding_weights_the_five_nearest_bins_by_a_gaussian():
    bins = ab_bins()
    index, weights = soft_encode(torch.tensor([[0.0, 0.0], [3.0, 4.0]]), bins)
    assert index.shape == weights.shape == (2, 5)
    assert torch.allclose(weights.sum(1), torch.ones(2))
    centres = [[tuple(bins[i].tolist()) for i in row] for row in index.tolist()]
    # (0, 0): itself at d = 0, then its four grid neighbours at d = 10 (a tie, any order).
    assert centres[0][0] == (0.0, 0.0)
    assert set(centres[0][1:]) == {(10.0, 0.0), (-10.0, 0.0), (0.0, 10.0), (0.0, -10.0)}
    e = math.exp(-100 / 50)  # exp(-d^2 / (2 sigma^2)), sigma = 5
    expected = torch.tensor([1, e, e, e, e]) / (1 + 4 * e)
    assert torch.allclose(weights[0], expected)
    # (3, 4): squared distances 25, 45, 65, 85 and 185 to these five, in this order.
    assert centres[1] == [(0.0, 0.0), (0.0, 10.0), (10.0, 0.0), (10.0, 10.0), (-10.0, 0.0)]
    raw = torch.tensor([math.exp(-d / 50) for d in (25, 45, 65, 85, 185)])
    assert torch.allclose(weights[1], raw / raw.sum())


def test_soft_encoding_in_chunks_equals_one_pass():
    ab = torch.randn(100, 2, generator=torch.Generator().manual_seed(1)) * 40
    index, weights = soft_encode(ab, ab_bins())
    index_c, weights_c = soft_encode(ab, ab_bins(), chunk=7)
    assert torch.equal(index, index_c) and torch.allclose(weights, weights_c)
    index_3, _ = soft_encode(ab, ab_bins(), neighbours=3, sigma=2.0)
    assert torch.equal(index_3[:, 0], index[:, 0])


def test_smoothing_spreads_counts_to_neighbouring_bins():
    bins = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    p = smoothed_distribution(torch.tensor([3, 0, 0, 0]), bins, sigma=5.0)
    # Kernel exp(-d^2 / 50): 1 at d = 0, e^-2 at d = 10, e^-4 at d = 10 sqrt(2).
    raw = torch.tensor([1, math.exp(-2), math.exp(-2), math.exp(-4)], dtype=torch.float64)
    assert torch.allclose(p, raw / raw.sum())
    uniform = smoothed_distribution(torch.zeros(4), bins)
    assert torch.allclose(uniform, torch.full((4,), 0.25, dtype=torch.float64))


def test_rebalancing_weights_by_hand():
    p = torch.tensor([0.5, 0.25, 0.25, 0.0], dtype=torch.float64)
    # lambda = 1/2, Q = 4: (p / 2 + 1/8)^-1 = [8/3, 4, 4, 8]; sum p w = 10/3; scale by 3/10.
    w = rebalancing_weights(p, 0.5)
    assert torch.allclose(w, torch.tensor([0.8, 1.2, 1.2, 2.4], dtype=torch.float64))
    assert (p * w).sum().item() == pytest.approx(1.0)
    assert torch.allclose(rebalancing_weights(p, 1.0), torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="lambda"):
        rebalancing_weights(p, 0.0)
