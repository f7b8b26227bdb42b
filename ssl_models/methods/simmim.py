"""SimMIM (Xie et al. 2022, "SimMIM: A Simple Framework for Masked Image Modeling",
arXiv:2111.09886), Section 3 and the official code (microsoft/SimMIM, ``models/simmim.py``):

    for x in loader:                         # one view: crop and flip
        M = random mask_patch_size blocks, mask_ratio of them, per sample
        t = patch_embed(x)                   # (N, L, D), no position embeddings yet
        t[M] = mask_token                    # one learnable token for every masked patch
        z = encoder(CLS, t + pos_embed)      # the ViT sees all L tokens
        pred = linear(z[:, 1:])              # one-layer head: (N, L, patch_size^2 * C)
        loss = mean over masked pixels of |pred - patchify(x)|     # L1, masked only

The official head is a 1x1 convolution to patch_size^2 * C channels and a pixel shuffle:
the same per-token linear map with its outputs in another order. The data stage supplies
one augmented view per image; the paper uses only random resized crops and flips, so set the
colour distortion off in the config (``augment.strength=0``, ``augment.jitter_prob=0``,
``augment.grayscale_prob=0``).
"""

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ssl_models.losses.masked_pixels import masked_pixel_loss
from ssl_models.method import Batch, MethodOutput, MethodRequirements, SSLMethod
from ssl_models.options import FRACTION, NON_NEGATIVE, check_options
from ssl_models.patches import expand_block_mask, patchify, random_masking
from ssl_models.registry import register
from ssl_models.vit import MaskedImageBackbone, masked_image_steps


@register("simmim")
class SimMIM(SSLMethod):
    """SimMIM: the ViT encodes every patch, masked ones as a mask token; a linear head
    regresses the raw pixels of the masked patches.

    Frozen-feature evaluation (``features``) uses the encoder's CLS token on the whole
    unmasked image, where no mask token appears.

    Args:
        backbone: a ViT (``model.backbone=vit_tiny``, ``vit_small`` or a timm ViT).
        feature_dim: its embedding dimension.
        mask_ratio: fraction of mask blocks masked per sample (0.6, the paper's).
        mask_patch_size: side in pixels of the square blocks masked together, a multiple of
            the backbone's patch size; 0 (default) means the patch size itself, one patch
            per block. The paper masks 32 px blocks of 192 px images (1/6 of the side); on
            28-32 px images the like block is about one 4 px patch, and larger blocks must
            tile the patch grid (8 px blocks fit 32 px images, not 28 px ones).
        norm_pix_loss: normalise each target patch by its mean and variance, as MAE does
            (default False: the paper regresses raw pixels).
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        mask_ratio: float = 0.6,
        mask_patch_size: int = 0,
        norm_pix_loss: bool = False,
    ) -> None:
        super().__init__(backbone, feature_dim)
        vit = masked_image_steps(backbone, "SimMIM")
        self.patch_size = vit.patch_size
        mask_patch_size = mask_patch_size or self.patch_size
        if mask_patch_size % self.patch_size:
            raise ValueError(
                f"mask_patch_size must be a multiple of the patch size {self.patch_size} "
                f"(or 0 for the patch size), got {mask_patch_size}"
            )
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.mask_patch_size = mask_patch_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, feature_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)  # official init
        self.head = nn.Linear(feature_dim, self.patch_size**2 * vit.in_channels)

    @property
    def vit(self) -> MaskedImageBackbone:
        """The backbone, through the ViT steps ``__init__`` checked it has."""
        return masked_image_steps(self.backbone, type(self).__name__)

    def sample_mask(self, batch: int, grid_h: int, grid_w: int, device: torch.device) -> Tensor:
        """A random (batch, grid_h * grid_w) patch mask, True = masked: ``mask_ratio`` of
        the ``mask_patch_size`` blocks of each sample, every block a square of patches."""
        scale = self.mask_patch_size // self.patch_size
        if grid_h % scale or grid_w % scale:
            raise ValueError(
                f"a {grid_h}x{grid_w} grid of {self.patch_size} px patches does not split into "
                f"{self.mask_patch_size} px mask blocks; use images whose sides are multiples "
                f"of mask_patch_size, or a smaller mask_patch_size"
            )
        blocks_h, blocks_w = grid_h // scale, grid_w // scale
        blocks = random_masking(batch, blocks_h * blocks_w, self.mask_ratio, device=device)
        return expand_block_mask(blocks.mask, blocks_h, blocks_w, scale)

    def reconstruct(self, images: Tensor, mask: Tensor) -> Tensor:
        """Predicted pixels (N, L, patch_size^2 * C) of every patch of ``images`` with the
        patches where ``mask`` (N, L) is True replaced by the mask token."""
        tokens = self.vit.embed_patches(images)  # (N, L, D), checks the image size
        grid_h, grid_w = (side // self.patch_size for side in images.shape[-2:])
        tokens = torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        tokens = tokens + self.vit.patch_position_embeddings(grid_h, grid_w)
        return self.head(self.vit.encode(tokens)[:, 1:])

    @classmethod
    def validate(cls, options: Mapping[str, Any]) -> None:
        """A mask ratio in (0, 1) and a mask patch size >= 0 (0: the ViT's patch size)."""
        check_options(options, mask_ratio=FRACTION, mask_patch_size=NON_NEGATIVE)

    @classmethod
    def requirements(cls, options: Mapping[str, Any]) -> MethodRequirements:
        """One view of whole images; ViT backbones only (it masks patch tokens)."""
        return MethodRequirements(global_views=1, backbone_kinds=("vit",))

    def loss(self, batch: Batch) -> MethodOutput:
        """SimMIM's loss: L1 between predicted and true pixels of the masked patches only."""
        views = batch.views
        (images,) = views
        grid_h, grid_w = (side // self.patch_size for side in images.shape[-2:])
        mask = self.sample_mask(images.shape[0], grid_h, grid_w, images.device)
        pred = self.reconstruct(images, mask)
        target = patchify(images, self.patch_size)
        loss = masked_pixel_loss(pred, target, mask, kind="l1", norm_pix=self.norm_pix_loss)
        logs = {"loss": loss.detach(), "mask_ratio": mask.float().mean()}
        return MethodOutput(loss=loss, logs=logs)
