"""Vision Transformer encoder (Dosovitskiy et al. 2021, arXiv:2010.11929) in the DeiT / DINO
configuration (Touvron et al. 2021, arXiv:2012.12877; Caron et al. 2021, arXiv:2104.14294).

The transformer blocks are torchvision's pre-norm ``EncoderBlock`` (LayerNorm eps 1e-6,
multi-head self-attention, GELU MLP); this module adds what torchvision's ``VisionTransformer``
does not offer: position embeddings interpolated to any patch grid (DINO's multi-crop local
views) and separate :meth:`ViT.embed_patches` / :meth:`ViT.patch_tokens` / :meth:`ViT.encode`
steps for masked-image modelling, which drops (MAE) or replaces (SimMIM) patch tokens in
between; :func:`masked_image_steps` gives those methods the steps of a backbone that has them.
"""

from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# torchvision ships no type information (no py.typed marker); EncoderBlock is an nn.Module.
from torchvision.models.vision_transformer import EncoderBlock  # type: ignore[import-untyped]

from ssl_models.library_backbones import timm_vit_steps


class ViT(nn.Module):
    """Patch embedding, CLS token, learnable position embeddings, pre-norm blocks, final norm.

    ``forward`` returns the CLS token after the final LayerNorm, shape (N, ``out_dim``). The
    position embeddings are learned for a square reference grid of ``grid_size`` x
    ``grid_size`` patches and resized bicubically for other grids. Input sides must be
    multiples of ``patch_size``: a :class:`ValueError` says so rather than cropping silently.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        patch_size: int = 16,
        image_size: int = 224,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by {num_heads} heads")
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch {patch_size}")
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.grid_size = image_size // patch_size
        self.num_heads = num_heads
        self.out_dim = embed_dim

        self.patch_embed = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Index 0 is the CLS token's; the rest follow the reference grid in row-major order.
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid_size**2, embed_dim))
        mlp_dim = int(embed_dim * mlp_ratio)
        self.blocks = nn.Sequential(
            *(EncoderBlock(num_heads, embed_dim, mlp_dim, 0.0, 0.0) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        # DeiT / DINO: truncated normal (std 0.02) for the tokens and every linear map, zero
        # biases, unit LayerNorms. torchvision's own init (xavier MLPs) is overridden so the
        # recipes' learning rates carry over; the patch conv keeps PyTorch's default, as there.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.MultiheadAttention):
                # The q, k, v projections are one fused parameter, not an nn.Linear.
                nn.init.trunc_normal_(m.in_proj_weight, std=0.02)
                nn.init.zeros_(m.in_proj_bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that ``ssl_models.optim.param_groups`` keeps out of weight
        decay besides biases and norms (the timm / DeiT convention)."""
        return {"pos_embed", "cls_token"}

    def patch_position_embeddings(self, grid_h: int, grid_w: int) -> Tensor:
        """Position embeddings of the patch tokens for a ``grid_h`` x ``grid_w`` grid, shape
        (1, grid_h * grid_w, D): the stored ones at the reference grid, else bicubically
        resized over the grid, as DINO does for crops of another size."""
        patch_pos = self.pos_embed[:, 1:]
        if (grid_h, grid_w) == (self.grid_size, self.grid_size):
            return patch_pos
        dim = patch_pos.shape[-1]
        grid = patch_pos.reshape(1, self.grid_size, self.grid_size, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)

    def embed_patches(self, x: Tensor) -> Tensor:
        """Embed an image batch (N, C, H, W) as patch embeddings WITHOUT position embeddings,
        shape (N, L, D) with L = (H / patch_size) * (W / patch_size) in row-major order.
        SimMIM replaces masked tokens here, before the positions are added."""
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"input size {height}x{width} is not divisible by the patch size "
                f"{self.patch_size}; resize or crop the images to a multiple of it"
            )
        return self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, D, H/p, W/p) -> (N, L, D)

    def patch_tokens(self, x: Tensor) -> Tensor:
        """:meth:`embed_patches` plus the position embeddings of the image's patch grid,
        shape (N, L, D), no CLS token. MAE drops tokens here, then calls :meth:`encode`."""
        grid_h, grid_w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        return self.embed_patches(x) + self.patch_position_embeddings(grid_h, grid_w)

    def encode(self, tokens: Tensor) -> Tensor:
        """Prepend the CLS token (with its position embedding) to a token sequence (N, L', D),
        such as :meth:`patch_tokens` output or any subset of it, and run the blocks and the
        final norm; return all tokens, shape (N, 1 + L', D), CLS first."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        return self.norm(self.blocks(torch.cat([cls, tokens], dim=1)))

    def feature_map(self, x: Tensor) -> Tensor:
        """The encoded patch tokens on their grid, (N, ``out_dim``, H / patch, W / patch)."""
        tokens = self.encode(self.patch_tokens(x))[:, 1:]
        grid_h, grid_w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        return tokens.transpose(1, 2).reshape(len(x), self.out_dim, grid_h, grid_w)

    def forward(self, x: Tensor) -> Tensor:
        """The CLS token after the final norm, (N, ``out_dim``): the image's features."""
        return self.encode(self.patch_tokens(x))[:, 0]


class MaskedImageBackbone(Protocol):
    """What masked-image modelling (MAE, SimMIM) uses of a backbone, as :class:`ViT` has it."""

    patch_size: int
    in_channels: int

    def embed_patches(self, x: Tensor) -> Tensor:
        """Patch embeddings (N, L, D) of images (N, C, H, W), no position or CLS token."""

    def patch_position_embeddings(self, grid_h: int, grid_w: int) -> Tensor:
        """Position embeddings (1, grid_h * grid_w, D) of a patch grid of that size."""

    def patch_tokens(self, x: Tensor) -> Tensor:
        """Patch embeddings plus their position embeddings, (N, L, D)."""

    def encode(self, tokens: Tensor) -> Tensor:
        """CLS + ``tokens`` (N, L', D) through the blocks and final norm: (N, 1 + L', D)."""


#: The names of :class:`MaskedImageBackbone`'s members, which the check below looks for.
MASKED_IMAGE_INTERFACE = (
    "patch_size",
    "in_channels",
    "embed_patches",
    "patch_position_embeddings",
    "patch_tokens",
    "encode",
)


def masked_image_steps(backbone: nn.Module, method: str) -> MaskedImageBackbone:
    """The ViT steps that ``method`` masks tokens between (:data:`MASKED_IMAGE_INTERFACE`):
    the backbone itself, or for a timm ``VisionTransformer`` its
    :class:`~ssl_models.library_backbones.TimmViTSteps`; a ValueError naming the backbone
    type for any other."""
    timm_steps = timm_vit_steps(backbone)
    if timm_steps is not None:
        return timm_steps
    missing = [name for name in MASKED_IMAGE_INTERFACE if not hasattr(backbone, name)]
    if missing:
        raise ValueError(
            f"{method} needs a Vision Transformer backbone, as it masks patch tokens between "
            f"the patch embedding and the transformer blocks; got {type(backbone).__name__} "
            f"(no {', '.join(missing)}). Use model.backbone=vit_tiny, vit_small or a timm "
            "ViT such as timm:vit_small_patch16_224"
        )
    return cast(MaskedImageBackbone, backbone)


# name -> (embed_dim, depth, num_heads) of DeiT-Ti / DeiT-S, also DINO's ViT-S.
VIT_CONFIGS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
}


def build_vit(
    name: str, *, width: float = 1.0, in_channels: int = 3, small_images: bool = True
) -> ViT:
    """Build ``vit_tiny`` or ``vit_small`` with the embedding dim scaled by ``width``.

    The head count stays fixed and the per-head dim is rounded (at least 1), so vit_tiny at
    width 0.5 has 3 heads of 32 (96 dims). ``small_images``: 4 px patches on a 32 px
    reference grid (8x8 tokens, for 28-32 px images); otherwise 16 px patches on 224 px
    (14x14), the papers' setting.
    """
    embed_dim, depth, num_heads = VIT_CONFIGS[name]
    head_dim = max(1, round(embed_dim * width / num_heads))
    patch_size, image_size = (4, 32) if small_images else (16, 224)
    return ViT(
        embed_dim=head_dim * num_heads,
        depth=depth,
        num_heads=num_heads,
        patch_size=patch_size,
        image_size=image_size,
        in_channels=in_channels,
    )
