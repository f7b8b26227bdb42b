"""Masked-image modelling's loss: the error of predicted pixels over the masked patches.

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
mean absolute error over the masked pixels. Patches and masks come from ``ssl_models.patches``.
"""

from typing import Literal

from torch import Tensor


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
        kind: ``"l2"`` (squared error) or ``"l1"`` (absolute error).
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
