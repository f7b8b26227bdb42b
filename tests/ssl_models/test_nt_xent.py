import math

import pytest
import torch

from ssl_models.losses import NTXentLoss, nt_xent_loss


def test_matches_hand_computed_value():
    # View a: a1 = (1, 0), a2 = (0, 1). View b, given unnormalised (norm 5) to exercise the
    # L2 normalisation: b1 = (0.6, 0.8), b2 = (0.8, 0.6). Pairs are (a1, b1) and (a2, b2).
    z_a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z_b = torch.tensor([[3.0, 4.0], [4.0, 3.0]])
    t = 0.5
    # Cosine similarities: a1.a2 = 0, a1.b1 = 0.6, a1.b2 = 0.8, a2.b1 = 0.8, a2.b2 = 0.6,
    # b1.b2 = 0.96. Each anchor: positive first, then its two negatives (self excluded).
    terms = {
        "a1": (0.6, [0.0, 0.8]),
        "a2": (0.6, [0.0, 0.8]),
        "b1": (0.6, [0.8, 0.96]),
        "b2": (0.6, [0.8, 0.96]),
    }
    losses = []
    for pos, negs in terms.values():
        numerator = math.exp(pos / t)
        denominator = numerator + sum(math.exp(s / t) for s in negs)
        losses.append(-math.log(numerator / denominator))
    expected = sum(losses) / 4

    assert nt_xent_loss(z_a, z_b, t).item() == pytest.approx(expected, rel=1e-6)


def test_invariant_to_input_scale():
    torch.manual_seed(0)
    z_a, z_b = torch.randn(6, 4), torch.randn(6, 4)
    assert torch.allclose(nt_xent_loss(z_a, z_b, 0.2), nt_xent_loss(3 * z_a, 0.1 * z_b, 0.2))


def test_aligned_pairs_score_lower_than_random_pairs():
    torch.manual_seed(0)
    z_a = torch.randn(16, 8)
    aligned = nt_xent_loss(z_a, z_a + 0.05 * torch.randn(16, 8), 0.2)
    unrelated = nt_xent_loss(z_a, torch.randn(16, 8), 0.2)
    assert aligned < unrelated


def test_module_validates_temperature():
    assert NTXentLoss(0.5).temperature == 0.5
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(0.0)
