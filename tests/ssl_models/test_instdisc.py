"""InstDisc: the NCE loss by hand, the memory bank's proximal update and Z estimate."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_models import build_method
from ssl_models.losses.nce import nce_loss
from ssl_models.method import Batch
from ssl_models.queue import MemoryBank
from tests.ssl_models.helpers import train_losses


def test_nce_loss_matches_hand_computation():
    # One image, its own entry scores 6.0, two noise entries 1.0 and 3.0; n = 4, Z = 8.
    scores = torch.tensor([[6.0, 1.0, 3.0]])
    m_over_n = 2 / 4
    p_data, p_noise = 6.0 / 8, [1.0 / 8, 3.0 / 8]
    expected = -math.log(p_data / (p_data + m_over_n)) - sum(
        math.log(m_over_n / (p + m_over_n)) for p in p_noise
    )
    assert nce_loss(scores, 8.0, num_images=4).item() == pytest.approx(expected, rel=1e-6)


def test_memory_bank_update_is_proximal_and_normalised():
    bank = MemoryBank(5, 3)
    before = bank.features.clone()
    new = F.normalize(torch.randn(2, 3), dim=1)
    bank.update(torch.tensor([1, 3]), new, momentum=0.5)
    expected = F.normalize(0.5 * before[[1, 3]] + 0.5 * new, dim=1)
    torch.testing.assert_close(bank.features[[1, 3]], expected)
    torch.testing.assert_close(bank.features[[0, 2, 4]], before[[0, 2, 4]])
    torch.testing.assert_close(bank.features.norm(dim=1), torch.ones(5))


def _instdisc(num_images: int = 16, **options):
    torch.manual_seed(0)
    return build_method(
        "instdisc",
        backbone="small_cnn",
        width=0.25,
        in_channels=1,
        num_images=num_images,
        **options,
    )


def test_normaliser_is_estimated_once_and_bank_entries_follow_the_batch():
    method = _instdisc(num_images=64, num_negatives=16, objective="nce")
    images, indices = torch.randn(8, 1, 16, 16), torch.arange(8, 16)
    untouched = method.bank.features[:8].clone()
    method(Batch([images], indices))
    z = float(method.normalizer)
    assert z > 0
    method(Batch([images], indices))
    assert float(method.normalizer) == z  # kept, not re-estimated
    torch.testing.assert_close(method.bank.features[:8], untouched)
    assert not torch.equal(method.bank.features[8:16], untouched)


def test_needs_indices_and_one_view():
    method = _instdisc()
    with pytest.raises(ValueError, match="indices"):
        method(Batch([torch.randn(4, 1, 16, 16)]))
    with pytest.raises(ValueError, match="num_images"):
        build_method("instdisc", backbone="small_cnn", width=0.25, in_channels=1)


def test_bank_survives_a_state_dict_round_trip():
    method = _instdisc(num_negatives=16, objective="nce")
    method(Batch([torch.randn(8, 1, 16, 16)], torch.arange(8)))
    copy = _instdisc(num_negatives=16, objective="nce")
    copy.load_state_dict(method.state_dict())
    assert torch.equal(copy.bank.features, method.bank.features)
    assert torch.equal(copy.normalizer, method.normalizer)


@pytest.mark.parametrize("objective", ["softmax", "nce"])
def test_training_discriminates_instances(objective):
    """Each image's feature ends closer to its own bank entry than to the others' entries.

    (On a 16-image toy set the NCE loss itself is not monotone: Z is estimated once, on
    the random initial bank, as in the paper; see the method's docstring.)
    """
    method = _instdisc(num_negatives=32, objective=objective)
    images, indices = torch.randn(16, 1, 16, 16), torch.arange(16)

    def own_minus_other_similarity() -> float:
        with torch.no_grad():
            v = F.normalize(method.embedding(method.backbone(images)), dim=1)
            sim = v @ method.bank.features[:16].T
            others = (sim.sum() - sim.diag().sum()) / (16 * 15)
            return (sim.diag().mean() - others).item()

    assert abs(own_minus_other_similarity()) < 0.05
    losses = train_losses(
        method, lambda: [images + 0.1 * torch.randn_like(images)], steps=60, indices=indices
    )
    assert all(math.isfinite(loss) for loss in losses)
    assert own_minus_other_similarity() > 0.2


def test_softmax_loss_is_cross_entropy_over_own_entry_and_shared_noise():
    method = _instdisc(num_negatives=8)
    images, indices = torch.randn(4, 1, 16, 16), torch.tensor([3, 0, 9, 5])
    bank = method.bank.features.clone()
    torch.manual_seed(7)
    loss = method(Batch([images], indices)).loss
    torch.manual_seed(7)
    noise = torch.randint(0, 16, (8,))  # the draw forward() makes after the same seed
    with torch.no_grad():
        v = F.normalize(method.embedding(method.backbone(images)), dim=1)
    logits = torch.cat([(bank[indices] * v).sum(1, keepdim=True), v @ bank[noise].T], 1) / 0.07
    expected = F.cross_entropy(logits, torch.zeros(4, dtype=torch.long))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
