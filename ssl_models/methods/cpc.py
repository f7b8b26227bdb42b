"""Contrastive Predictive Coding for images (van den Oord, Li and Vinyals 2018, "Representation
Learning with Contrastive Predictive Coding", arXiv:1807.03748, Section 3.2), with the details
Hénaff et al. 2019 ("Data-Efficient Image Recognition with Contrastive Predictive Coding",
arXiv:1905.09272, CPC v2) made explicit: the PixelCNN context network of their appendix
pseudo-code and layer norm in the encoder.

    for x in loader:                               # one augmented view per image
        x = grid of overlapping patches            # paper: 256 px -> 7x7 of 64 px, stride 32
        x = random subcrop of each patch, padded   # paper: 60 of 64 px
        z[i, j] = mean_pool(f(x[i, j]))            # every patch alone, one encoder pass
        c = g_ar(z)                                # c[i, j] sees only rows <= i
        for k in 1..K:                             # paper: up to 5 rows below
            pred = W_k c[i, j]
            loss += InfoNCE(pred, positive z[i + k, j], candidates: every z in the batch)

The score of a candidate is the paper's log-bilinear f_k = exp(z^T W_k c); the candidates
are all patch embeddings of the global batch (other positions of the same image and all
other images), gathered from every worker with gradient. The data stage ships each view as
(N, R * C, ch, p, p) patches in row-major grid order; images are square, so the grid is too
and ``forward`` reads its side off the number of patches.

Batch norm in the encoder would let a patch's embedding depend on every other patch of the
batch through the batch statistics, a path around the causal context that CPC v2 found the
network exploits; ``encoder_norm="layer"`` swaps it for per-patch layer norm, which also
makes the causality exact. Frozen-feature evaluation follows the paper too: the mean of the
patch embeddings of the whole (un-cropped) grid.
"""

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models.dist import gather_with_grad, rank
from ssl_models.method import Batch, MethodOutput, MethodRequirements, SSLMethod
from ssl_models.options import AT_LEAST_ONE, UP_TO_ONE, check_options, one_of, require
from ssl_models.registry import register
from ssl_models.transforms.patch_grid import PatchGridViews, patch_grid

NORMS = ("layer", "batch")


def layer_norm_encoder(module: nn.Module) -> nn.Module:
    """Replace every batch norm by layer norm over each sample's (C, H, W) (GroupNorm with
    one group, per-channel scale and shift), in place, as CPC v2 does."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d | nn.SyncBatchNorm):
            setattr(module, name, nn.GroupNorm(1, child.num_features, eps=child.eps))
        else:
            layer_norm_encoder(child)
    return module


class CausalBlock(nn.Module):
    """One residual block of CPC v2's PixelCNN: a 1x3 convolution along the row, then a 2x1
    one over the row above and the row itself (the top padded): a factorised 3x3 convolution
    masked to its upper two rows. Output row i sees input rows i - 1 and i only."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(dim, hidden, 1)
        self.along_row = nn.Conv2d(hidden, hidden, (1, 3), padding=(0, 1))
        self.from_above = nn.Conv2d(hidden, hidden, (2, 1))
        self.expand = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        """A residual step on context features (N, D, R, C): output row i sees input rows
        i - 1 and i only."""
        h = self.along_row(F.relu(self.reduce(x)))
        h = F.relu(self.from_above(F.pad(h, (0, 0, 1, 0))))  # pad one row on top only
        return x + self.expand(h)


@register("cpc")
class CPC(SSLMethod):
    """CPC: encoder on every patch, masked-convolution context over rows, InfoNCE on the
    patches up to ``prediction_steps`` rows below.

    Args:
        backbone: a convolutional encoder mapping patches to (M, feature_dim) pooled features.
        feature_dim: backbone output dimension.
        patch_size: patch side in px (paper: 64 on 256 px images; 8 on 28-32 px gives 6x6
            and 7x7 grids at the default stride).
        patch_stride: step between patches in px (paper: 32, half a patch).
        patch_crop: subcrop side as a share of the patch, padded back (paper: 60 / 64).
        greyscale: convert RGB images to grey before cutting (paper v1: yes). Off by default:
            frozen-feature evaluation sees colour, which such an encoder never trained on.
        prediction_steps: K, predict rows 1..K below each context (paper: up to 5).
        context_blocks: residual blocks of the PixelCNN context network (CPC v2: 5).
        context_hidden_dim: their bottleneck width (CPC v2: 256).
        encoder_norm: "layer" (CPC v2) swaps the backbone's batch norms for layer norm;
            "batch" keeps them (v1; leaks across patches, so causality is not exact).
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        patch_size: int = 8,
        patch_stride: int = 4,
        patch_crop: float = 60 / 64,
        greyscale: bool = False,
        prediction_steps: int = 5,
        context_blocks: int = 5,
        context_hidden_dim: int = 256,
        encoder_norm: str = "layer",
    ) -> None:
        if encoder_norm == "layer":
            backbone = layer_norm_encoder(backbone)
        super().__init__(backbone, feature_dim)
        self.patch_size, self.patch_stride = patch_size, patch_stride
        self.context = nn.Sequential(
            *(CausalBlock(feature_dim, context_hidden_dim) for _ in range(context_blocks)),
            nn.ReLU(),
        )
        self.predictors = nn.ModuleList(
            nn.Linear(feature_dim, feature_dim) for _ in range(prediction_steps)
        )  # W_k, k = 1..K

    @classmethod
    def validate(cls, options: Mapping[str, Any]) -> None:
        """Ranges (sizes and steps of at least 1, a crop in (0, 1], a known norm), a stride
        no larger than the patch, and a crop that keeps at least one pixel."""
        check_options(
            options,
            patch_size=AT_LEAST_ONE,
            patch_stride=AT_LEAST_ONE,
            patch_crop=UP_TO_ONE,
            prediction_steps=AT_LEAST_ONE,
            context_blocks=AT_LEAST_ONE,
            context_hidden_dim=AT_LEAST_ONE,
            encoder_norm=one_of(*NORMS),
        )
        size, stride, crop = options["patch_size"], options["patch_stride"], options["patch_crop"]
        require(stride <= size, "patch_stride", f"must be <= patch_size ({size}), got {stride}")
        require(math.floor(size * crop) >= 1, "patch_crop", f"leaves no pixel, got {crop}")

    @classmethod
    def requirements(cls, options: Mapping[str, Any]) -> MethodRequirements:
        """One view, which the data stage cuts into a square grid of overlapping patches;
        convolutional backbones only, which see patches, not whole images."""
        grid = PatchGridViews(
            patch=options["patch_size"],
            stride=options["patch_stride"],
            crop=options["patch_crop"],
            greyscale=options["greyscale"],
        )
        return MethodRequirements(
            global_views=1,
            # The paper's encoders are ResNets; 8 px patches are no multiple of a ViT's tokens.
            backbone_kinds=("cnn",),
            whole_images_first=False,  # the backbone sees patches
            pretext=grid,
        )

    def embed_patches(self, patches: Tensor) -> Tensor:
        """Patches (N, R * C, ch, p, p) of a square grid -> embeddings z (N, R, C, D)."""
        n, count = patches.shape[:2]
        side = math.isqrt(count)
        if side * side != count:
            raise ValueError(f"CPC's patch grid is square, got {count} patches per image")
        return self.backbone(patches.flatten(0, 1)).view(n, side, side, -1)

    def contexts(self, z: Tensor) -> Tensor:
        """Contexts c (N, R, C, D) of z (N, R, C, D): row i depends on rows <= i of z only."""
        return self.context(z.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def predictive_loss(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """InfoNCE summed over steps k (each the mean over its positions, as CPC v2's
        pseudo-code) and the top-1 accuracy of finding the positive among all candidates."""
        n, rows, cols, dim = z.shape
        if rows <= len(self.predictors):
            raise ValueError(
                f"a {rows}-row grid leaves no context {len(self.predictors)} rows ahead: "
                "lower prediction_steps or the patch size"
            )
        c = self.contexts(z)
        candidates = gather_with_grad(z.reshape(-1, dim))  # (N_global * R * C, D)
        # z[b, i, j] is candidate (rank's offset) + (b * R + i) * C + j.
        own = torch.arange(n * rows * cols, device=z.device).view(n, rows, cols)
        own = own + rank() * n * rows * cols
        loss, correct, total = z.new_zeros(()), z.new_zeros((), dtype=torch.long), 0
        for k, predictor in enumerate(self.predictors, start=1):
            prediction = predictor(c[:, : rows - k]).reshape(-1, dim)  # W_k c[i, j]
            positives = own[:, k:].reshape(-1)  # z[i + k, j], same image
            logits = prediction @ candidates.T  # log f_k = z^T W_k c
            loss = loss + F.cross_entropy(logits, positives)
            correct += (logits.detach().argmax(1) == positives).sum()
            total += len(positives)
        return loss, correct / total

    def loss(self, batch: Batch) -> MethodOutput:
        """InfoNCE for every prediction step k, summed: each context predicts the patch k rows
        below it among all patches of the global batch."""
        patches = batch.views[0]
        if patches.ndim != 5:
            raise ValueError(
                f"CPC takes the data stage's patches (N, R * C, ch, p, p), got {patches.shape}"
            )
        loss, accuracy = self.predictive_loss(self.embed_patches(patches))
        return MethodOutput(
            loss=loss, logs={"loss": loss.detach(), "pretext_accuracy": accuracy.detach()}
        )

    def features(self, images: Tensor) -> Tensor:
        """The paper's evaluation features: patch embeddings of the grid, mean-pooled."""
        patches = patch_grid(images, self.patch_size, self.patch_stride)
        return self.embed_patches(patches).mean(dim=(1, 2))
