"""Masked-image modelling's shared pieces: patch layout, random masks, the masked loss."""

import math

import pytest
import torch

from ssl_models.losses.masked_pixels import masked_pixel_loss, normalize_patches
from ssl_models.patches import (
    expand_block_mask,
    gather_tokens,
    num_masked,
    patchify,
    random_masking,
    unpatchify,
)


def test_patchify_lists_patches_and_their_pixels_in_row_major_order():
    image = torch.arange(16.0).reshape(1, 1, 4, 4)
    expected = torch.tensor(
        [[0.0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    ).unsqueeze(0)
    assert torch.equal(patchify(image, 2), expected)
    # Channels last within a pixel (the official "nchpwq->nhwpqc").
    two = torch.stack([torch.arange(4.0), 10 + torch.arange(4.0)]).reshape(1, 2, 2, 2)
    assert patchify(two, 2).tolist() == [[[0.0, 10, 1, 11, 2, 12, 3, 13]]]


def test_patchify_and_unpatchify_invert_each_other_exactly():
    images = torch.randn(2, 3, 8, 12)
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 48)
    assert torch.equal(unpatchify(patches, 4, 2, 3), images)
    assert torch.equal(patchify(unpatchify(patches, 4, 2, 3), 4), patches)
    with pytest.raises(ValueError, match="10x12 is not divisible by the patch size 4"):
        patchify(torch.randn(1, 1, 10, 12), 4)
    with pytest.raises(ValueError, match="3x3 grid"):
        unpatchify(patches, 4, 3, 3)


def test_random_masking_masks_the_same_count_in_different_places_per_sample():
    n, length, ratio = 16, 49, 0.75
    masking = random_masking(n, length, ratio, generator=torch.Generator().manual_seed(0))
    masked = round(length * ratio)
    assert masking.mask.dtype == torch.bool and masking.mask.shape == (n, length)
    assert masking.mask.sum(dim=1).tolist() == [masked] * n
    assert len({tuple(row.tolist()) for row in masking.mask}) == n  # a new subset each
    assert masking.ids_keep.shape == (n, length - masked)
    for row, keep in zip(masking.mask, masking.ids_keep, strict=True):
        assert sorted(keep.tolist()) == torch.nonzero(~row).flatten().tolist()


def test_ids_restore_is_the_inverse_of_the_shuffle():
    masking = random_masking(4, 10, 0.6, generator=torch.Generator().manual_seed(1))
    ids_shuffle = masking.ids_restore.argsort(dim=1)
    keep = masking.ids_keep.shape[1]
    assert keep == 4
    assert torch.equal(ids_shuffle[:, :keep], masking.ids_keep)
    tokens = torch.randn(4, 10, 3)
    # Visible tokens, then masked ones, in shuffled order; unshuffling restores the input.
    shuffled = gather_tokens(tokens, ids_shuffle)
    assert torch.equal(shuffled[:, :keep], gather_tokens(tokens, masking.ids_keep))
    assert torch.equal(gather_tokens(shuffled, masking.ids_restore), tokens)
    # The masked ones are exactly those ranked after the visible ones.
    assert torch.equal(masking.mask, masking.ids_restore >= keep)


def test_random_masking_is_reproducible_with_a_seeded_generator():
    def draw(seed):
        return random_masking(3, 16, 0.5, generator=torch.Generator().manual_seed(seed))

    first, again, other = draw(7), draw(7), draw(8)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first.mask, other.mask)


def test_mask_count_is_rounded_and_leaves_a_patch_on_each_side():
    assert num_masked(49, 0.75) == 37
    assert num_masked(196, 0.75) == 147
    assert num_masked(49, 0.6) == 29
    with pytest.raises(ValueError, match="masks 0 of 4 patches"):
        num_masked(4, 0.1)
    with pytest.raises(ValueError, match="masks 4 of 4 patches"):
        num_masked(4, 0.9)


def test_block_mask_expands_each_block_to_a_square_of_patches():
    blocks = torch.tensor([[True, False, False, True]])  # a 2x2 grid of blocks
    expected = torch.tensor(
        [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(expand_block_mask(blocks, 2, 2, 2), expected.flatten().unsqueeze(0))
    wide = expand_block_mask(torch.tensor([[False, True, False]]), 1, 3, 3)
    assert wide.reshape(3, 9)[:, 3:6].all() and wide.sum() == 9


def test_masked_loss_matches_hand_computed_values():
    # Two patches of 4 pixels; only the first is masked. The prediction is 0.
    target = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 9.0]]])
    pred = torch.zeros_like(target)
    mask = torch.tensor([[True, False]])
    # Raw pixels: mean of 1, 4, 9, 16 and of 1, 2, 3, 4.
    assert masked_pixel_loss(pred, target, mask).item() == pytest.approx(7.5)
    assert masked_pixel_loss(pred, target, mask, kind="l1").item() == pytest.approx(2.5)
    # Normalised: mean 2.5, unbiased variance 5/3, so the target is (-1.5, -.5, .5, 1.5)
    # over sqrt(5/3 + 1e-6).
    var = 5 / 3 + 1e-6
    l2 = masked_pixel_loss(pred, target, mask, norm_pix=True)
    assert l2.item() == pytest.approx((2.25 + 0.25 + 0.25 + 2.25) / 4 / var, rel=1e-6)
    l1 = masked_pixel_loss(pred, target, mask, kind="l1", norm_pix=True)
    assert l1.item() == pytest.approx(1 / math.sqrt(var), rel=1e-6)
    # A float mask weighs the same.
    assert masked_pixel_loss(pred, target, mask.float()).item() == pytest.approx(7.5)
    with pytest.raises(ValueError, match="'l1' or 'l2'"):
        masked_pixel_loss(pred, target, mask, kind="huber")


@pytest.mark.parametrize("kind", ["l1", "l2"])
@pytest.mark.parametrize("norm_pix", [False, True])
def test_visible_patches_neither_change_the_loss_nor_get_gradient(kind, norm_pix):
    g = torch.Generator().manual_seed(0)
    target = torch.randn(3, 5, 12, generator=g)
    pred = torch.randn(3, 5, 12, generator=g, requires_grad=True)
    mask = torch.rand(3, 5, generator=g) < 0.5
    mask[0, 0], mask[0, 1] = True, False
    loss = masked_pixel_loss(pred, target, mask, kind=kind, norm_pix=norm_pix)
    loss.backward()
    assert (pred.grad[~mask] == 0).all()
    assert (pred.grad[mask].abs().sum(dim=-1) > 0).all()
    # Other values in the visible patches give the same loss.
    noise = 10 * torch.randn(3, 5, 12, generator=g) * (~mask).unsqueeze(-1)
    again = masked_pixel_loss(pred + noise, target - noise, mask, kind=kind, norm_pix=norm_pix)
    assert again.item() == pytest.approx(loss.item(), rel=1e-6)


def test_normalised_patches_have_zero_mean_and_unit_variance():
    patches = 3 + 2 * torch.randn(4, 6, 48)
    normed = normalize_patches(patches)
    assert torch.allclose(normed.mean(-1), torch.zeros(4, 6), atol=1e-5)
    assert torch.allclose(normed.var(-1), torch.ones(4, 6), atol=1e-4)
    # A flat patch stays finite (0), thanks to eps.
    assert normalize_patches(torch.ones(1, 1, 4)).abs().max() == 0
