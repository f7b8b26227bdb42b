"""Masked-image modelling's shared pieces: patches, random masks and the masked pixel loss.

MAE (He et al. 2022, arXiv:2111.06377) and SimMIM (Xie et al. 2022, arXiv:2111.09886) both
hide a random subset of an image's patches and regress the hidden pixels. As in the official
MAE code (``models_mae.py``):

    patchify(x)           # (N, C, H, W) -> (N, L, p*p*C), row-major patches, channels last
    noise = rand(N, L)                        # per sample
    ids_shuffle = argsort(noise); ids_restore = argsort(ids_shuffle)
    ids_keep = ids_shuffle[:, :L - M]         # visible patches, M masked
    mask[n, i] = 1 if patch i is masked       # = ids_restore >= L - M

    target = patchify(x)
    if norm_pix:                              # per patch, unbiased variance, eps 1e-6
        target = (target - mean(target)) / sqrt(var(target) + eps)
    err = (pred - target)^2                   # MAE; SimMIM: |pred - target|
    loss = sum(mean(err, per patch) * mask) / sum(mask)     # masked patches only

SimMIM's official loss, ``sum(|x - x_rec| * mask) / sum(mask) / C`` over pixels, is the same
mean absolute error over the masked pixels. Everything here is a pure function of tensors.
"""

from typing import Literal, NamedTuple

import torch
from torch import Tensor


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(N, C, H, W) -> (N, L, patch_size^2 * C): one row per patch, patches in row-major
    order, each row the patch's pixels in row-major order with channels last (the official
    ``einsum("nchpwq->nhwpqc")``). H and W must be multiples of ``patch_size``."""
    n, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
    x = images.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, patch_size: int, grid_h: int, grid_w: int) -> Tensor:
    """Inverse of :func:`patchify`: (N, grid_h * grid_w, p^2 * C) -> (N, C, grid_h * p,
    grid_w * p), e.g. to look at a reconstruction."""
    n, length, dim = patches.shape
    p = patch_size
    if length != grid_h * grid_w or dim % (p * p):
        raise ValueError(
            f"patches of shape {tuple(patches.shape)} do not form a {grid_h}x{grid_w} grid "
            f"of {p}x{p} patches"
        )
    c = dim // (p * p)
    x = patches.reshape(n, grid_h, grid_w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, c, grid_h * p, grid_w * p)


def num_masked(length: int, mask_ratio: float) -> int:
    """Patches (or blocks) to mask out of ``length``: ``round(length * mask_ratio)``. The
    official codes round up instead (MAE keeps ``int(L * (1 - r))``, SimMIM masks
    ``ceil(L * r)``): at most one more when ``L * r`` is not a whole number, none at the
    papers' settings (L = 196, r = 0.75; 36 blocks, r = 0.6 gives 21.6 -> 22 both ways)."""
    count = round(length * mask_ratio)
    if not 0 < count < length:
        raise ValueError(
            f"mask_ratio {mask_ratio} masks {count} of {length} patches; "
            "at least one must be masked and one visible"
        )
    return count


class Masking(NamedTuple):
    """A random mask per sample, as :func:`random_masking` draws it."""

    mask: Tensor  # (N, L) bool, True where the patch is masked
    ids_keep: Tensor  # (N, L - M) visible patches' indices, in shuffled order
    ids_restore: Tensor  # (N, L) inverse of the shuffle: gather [visible, masked] to unshuffle


def random_masking(
    batch: int,
    length: int,
    mask_ratio: float,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Masking:
    """Mask :func:`num_masked` of ``length`` patches in each of ``batch`` samples, a new
    uniformly random subset per sample, by sorting uniform noise (official MAE)."""
    keep = length - num_masked(length, mask_ratio)
    noise = torch.rand(batch, length, device=device, generator=generator)
    ids_shuffle = noise.argsort(dim=1)  # the first `keep` are visible
    ids_restore = ids_shuffle.argsort(dim=1)  # each patch's rank in the shuffle
    return Masking(ids_restore >= keep, ids_shuffle[:, :keep], ids_restore)


def expand_block_mask(block_mask: Tensor, blocks_h: int, blocks_w: int, scale: int) -> Tensor:
    """A mask over a ``blocks_h`` x ``blocks_w`` grid of blocks, (N, blocks_h * blocks_w),
    as a mask over the patches, (N, blocks_h * scale * blocks_w * scale) in row-major order:
    each block covers ``scale`` x ``scale`` patches (SimMIM's mask patches)."""
    n = block_mask.shape[0]
    grid = block_mask.reshape(n, blocks_h, blocks_w)
    return grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2).flatten(1)


def gather_tokens(tokens: Tensor, ids: Tensor) -> Tensor:
    """``tokens[n, ids[n]]`` for each sample: (N, L, D) and (N, K) indices -> (N, K, D)."""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def normalize_patches(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """Each patch (row) minus its mean, over sqrt(its unbiased variance + eps) (MAE's
    ``norm_pix_loss`` target)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def masked_pixel_loss(
    pred: Tensor,
    target: Tensor,
    mask: Tensor,
    *,
    kind: Literal["l1", "l2"] = "l2",
    norm_pix: bool = False,
    eps: float = 1e-6,
) -> Tensor:
    """Mean squared (``"l2"``, MAE) or absolute (``"l1"``, SimMIM) error of predicted patch
    pixels over the masked patches only.

    Args:
        pred: (N, L, P) predicted pixels, P = patch_size^2 * C.
        target: (N, L, P) the image's pixels, :func:`patchify` of it.
        mask: (N, L), true (or 1) where the patch is masked; must mask at least one patch.
        norm_pix: compare with each target patch normalised by its own mean and variance
            (:func:`normalize_patches`); the prediction is then in those units.
        eps: added to the variance when ``norm_pix``.

    Visible patches contribute nothing: their error is weighted by 0, so they get no
    gradient (a weighted mean rather than indexing: no host sync on the mask's count).
    """
    if kind not in ("l1", "l2"):
        raise ValueError(f"kind must be 'l1' or 'l2', got {kind!r}")
    if norm_pix:
        target = normalize_patches(target, eps)
    diff = pred - target
    per_patch = (diff.square() if kind == "l2" else diff.abs()).mean(dim=-1)  # (N, L)
    weights = mask.to(per_patch.dtype)
    return (per_patch * weights).sum() / weights.sum()
