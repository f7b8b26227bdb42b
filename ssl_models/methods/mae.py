"""MAE (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners", arXiv:2111.06377),
Section 3 and the official code (facebookresearch/mae, ``models_mae.py``):

    for x in loader:                        # one view: crop and flip, no colour jitter
        t = patch_embed(x) + pos_embed      # (N, L, D) patch tokens
        keep = argsort(rand(N, L))[:, :L-M] # per sample; M = mask_ratio of the L patches
        z = encoder(CLS, t[keep])           # the ViT sees only the visible patches
        y = decoder_embed(z)                # a narrower, shallower decoder
        y = unshuffle(y, [mask_token] * M) + sincos_pos_embed     # all L, original order
        pred = decoder_pred(decoder(y))     # (N, L, patch_size^2 * C) pixel values
        target = patchify(x), each patch normalised by its mean and std (norm_pix_loss)
        loss = mean over masked patches of mean((pred - target)^2)

The data stage supplies one augmented view per image; the paper uses only random resized
crops and flips, so set the colour distortion off in the config (``augment.strength=0``,
``augment.jitter_prob=0``, ``augment.grayscale_prob=0``). The encoder keeps the backbone's
learned position embeddings (the official encoder's are fixed sine-cosine); the decoder's are
fixed sine-cosine as in the official code, computed for the input's patch grid.
"""

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

# torchvision ships no type information (no py.typed marker); EncoderBlock is an nn.Module.
from torchvision.models.vision_transformer import EncoderBlock  # type: ignore[import-untyped]

from ssl_models.losses.masked_pixels import masked_pixel_loss
from ssl_models.method import Batch, MethodOutput, MethodRequirements, SSLMethod
from ssl_models.options import AT_LEAST_ONE, FRACTION, check_options, require
from ssl_models.patches import gather_tokens, patchify, random_masking
from ssl_models.registry import register
from ssl_models.vit import MaskedImageBackbone, masked_image_steps


def sincos_position_embeddings(dim: int, grid_h: int, grid_w: int) -> Tensor:
    """Fixed 2-D sine-cosine embeddings, (grid_h * grid_w, dim) in row-major order, as the
    official ``get_2d_sincos_pos_embed``: the first half of the dims encodes the column, the
    second half the row, each as [sin(pos * w_k), cos(pos * w_k)], w_k = 10000^(-4k / dim)."""
    if dim % 4:
        raise ValueError(f"sine-cosine position embeddings need dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64),
        torch.arange(grid_w, dtype=torch.float64),
        indexing="ij",
    )
    halves = []
    for pos in (cols, rows):
        angles = pos.flatten()[:, None] * omega[None, :]
        halves += [angles.sin(), angles.cos()]
    return torch.cat(halves, dim=1).float()


class MAEDecoder(nn.Module):
    """Linear map to ``dim``, mask tokens in the masked places, fixed sine-cosine positions,
    ``depth`` pre-norm transformer blocks, LayerNorm, linear map to ``out_dim`` pixels."""

    def __init__(self, encoder_dim: int, dim: int, depth: int, heads: int, out_dim: int) -> None:
        super().__init__()
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(
            *(EncoderBlock(heads, dim, 4 * dim, 0.0, 0.0) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, out_dim)
        # Official init: xavier-uniform linear maps, zero biases, mask token N(0, 0.02).
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, latent: Tensor, ids_restore: Tensor, grid_h: int, grid_w: int) -> Tensor:
        """Encoder output (N, 1 + K, D), CLS first -> predicted patches (N, L, out_dim)."""
        x = self.embed(latent)
        n, length = ids_restore.shape
        masked = self.mask_token.expand(n, length - (x.shape[1] - 1), -1)
        patches = gather_tokens(torch.cat([x[:, 1:], masked], dim=1), ids_restore)
        pos = sincos_position_embeddings(x.shape[-1], grid_h, grid_w).to(x.device, x.dtype)
        x = torch.cat([x[:, :1], patches + pos], dim=1)  # the CLS position embedding is 0
        return self.pred(self.norm(self.blocks(x)))[:, 1:]


@register("mae")
class MAE(SSLMethod):
    """MAE: a ViT encodes the visible patches, a small decoder regresses the masked ones.

    Frozen-feature evaluation (``features``) uses the encoder's CLS token on the whole
    unmasked image, as the paper's linear probe does (it reports mean-pooled patch tokens
    as about equal).

    Args:
        backbone: a ViT (``model.backbone=vit_tiny``, ``vit_small`` or a timm ViT).
        feature_dim: its embedding dimension.
        mask_ratio: fraction of patches masked per sample (0.75, the paper's best).
        decoder_dim, decoder_depth, decoder_heads: the decoder's width, blocks and heads. The
            paper's 512 / 8 / 16 serve ViT-B to ViT-H (768-1280 dims) on 196 tokens; here
            128 / 4 / 4 keep its 32-dim heads, and per token cost 4 * 128^2, about 15% of a
            full-width vit_tiny's 12 * 192^2, between the paper's ViT-L (8%) and ViT-B (30%)
            ratios. Depth 4 keeps most of the linear-probe gain of its Table 1a (71.9% vs
            73.5% at depth 8); on 28-32 px images the decoder sees only 49-64 tokens.
        norm_pix_loss: normalise each target patch by its mean and variance (Table 1d:
            better representations). True here, as in the official pretraining recipe
            (``main_pretrain.py --norm_pix_loss``); the official model's own default is False.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        mask_ratio: float = 0.75,
        decoder_dim: int = 128,
        decoder_depth: int = 4,
        decoder_heads: int = 4,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__(backbone, feature_dim)
        vit = masked_image_steps(backbone, "MAE")
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.patch_size = vit.patch_size
        out_dim = self.patch_size**2 * vit.in_channels
        self.decoder = MAEDecoder(feature_dim, decoder_dim, decoder_depth, decoder_heads, out_dim)

    @property
    def vit(self) -> MaskedImageBackbone:
        """The backbone, through the ViT steps ``__init__`` checked it has."""
        return masked_image_steps(self.backbone, type(self).__name__)

    @classmethod
    def validate(cls, options: Mapping[str, Any]) -> None:
        """A mask ratio in (0, 1), decoder sizes of at least 1, and a decoder width
        divisible by its heads and by 4 (sine-cosine position embeddings)."""
        check_options(
            options,
            mask_ratio=FRACTION,
            decoder_dim=AT_LEAST_ONE,
            decoder_depth=AT_LEAST_ONE,
            decoder_heads=AT_LEAST_ONE,
        )
        dim, heads = options["decoder_dim"], options["decoder_heads"]
        require(
            dim % heads == 0 and dim % 4 == 0,
            "decoder_dim",
            f"{dim} must be divisible by decoder_heads ({heads}) and by 4 (sine-cosine "
            "position embeddings)",
        )

    @classmethod
    def requirements(cls, options: Mapping[str, Any]) -> MethodRequirements:
        """One view of whole images; ViT backbones only (it drops patch tokens)."""
        return MethodRequirements(global_views=1, backbone_kinds=("vit",))

    def loss(self, batch: Batch) -> MethodOutput:
        """MAE's loss: mean squared error on the masked patches only (per-patch normalised
        targets with ``norm_pix_loss``), the encoder having seen only the visible ones."""
        views = batch.views
        (images,) = views
        tokens = self.vit.patch_tokens(images)  # (N, L, D), checks the image size
        grid_h, grid_w = (side // self.patch_size for side in images.shape[-2:])
        n, length = tokens.shape[:2]
        masking = random_masking(n, length, self.mask_ratio, device=images.device)
        latent = self.vit.encode(gather_tokens(tokens, masking.ids_keep))
        pred = self.decoder(latent, masking.ids_restore, grid_h, grid_w)
        target = patchify(images, self.patch_size)
        loss = masked_pixel_loss(pred, target, masking.mask, norm_pix=self.norm_pix_loss)
        masked = masking.mask.float().mean()
        return MethodOutput(loss=loss, logs={"loss": loss.detach(), "mask_ratio": masked})
