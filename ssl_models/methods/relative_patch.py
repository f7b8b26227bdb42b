"""Context prediction (Doersch, Gupta and Efros 2015, "Unsupervised Visual Representation
Learning by Context Prediction", arXiv:1505.05192): tell where a patch lies relative to
another. Sections 3-4 and the authors' code (cdoersch/deepcontext, ``train.py``):

    for x in loader:                        # one augmented view per image
        cells = 3 x 3 grid over x           # one patch + gap per cell (paper: 96 + 48 px)
        y = uniform in 0..7                 # a neighbour of the centre, row-major, centre skipped
        p, q = patch(centre), patch(y)      # each jittered inside its cell (paper: +-7 px)
        p, q = pixelate(p), pixelate(q)     # some patches down- then up-sampled
        p, q = colour(p), colour(q)         # projection or colour dropping (RGB only)
        p, q = normalise(p), normalise(q)   # each patch on its own: zero mean, unit RMS
        h = concat(fc6(f(p)), fc6(f(q)))    # f and fc6 shared: one patch encoder, late fusion
        loss = CE(fc9(fc8(fc7(h))), y)      # 8-way classification

The data stage does all but the normalisation (views are uint8) and ships ``view_0`` (N, 2,
C, t, t) = (centre, neighbour) and ``target_position`` (N,). The tricks defeat shortcuts:
gap and jitter stop edges and lines being continued across borders; per-patch normalisation
makes low-level cues (a brightness gradient) useless; projection or colour dropping hides
chromatic aberration, which shifts green against magenta away from the lens centre;
pixelation makes the features robust to low resolution.

The geometry keeps the paper's ratios at any size: ``side // 3`` px cells of a tile plus a
gap of ``gap_ratio`` tiles (48 / 96), tiles jittered by ``jitter_ratio`` tiles (7 / 96, at
least 1 px). 28 px: 9 px cells, 6 px tiles, 3 px gaps, +-1 px; 32 px: 7 px tiles; 432 px:
the paper's 96 / 48 / 7. Tiles stay ``gap - 2 * jitter`` px apart or more (paper: 34 px).
The paper draws grids all over a larger image; here the augmentation's crop places the grid.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models.backbones import CNN_BACKBONES
from ssl_models.method import MethodOutput, PretextViews, SSLMethod
from ssl_models.patches import grid_tiles

GRID, CENTRE, NUM_POSITIONS = 3, 4, 8  # 3 x 3 cells; the centre is cell 4 in row-major order
COLOURS = ("projection", "drop", "none")


def patch_geometry(side: int, gap_ratio: float, jitter_ratio: float) -> tuple[int, int]:
    """(tile, jitter) px for images of ``side`` px: cells of tile + gap, jitter >= 1 px."""
    cell = side // GRID
    tile = round(cell / (1 + gap_ratio))
    jitter = max(1, round(jitter_ratio * tile)) if jitter_ratio > 0 else 0
    if tile < 1 or tile + 2 * jitter > cell:
        raise ValueError(
            f"a {GRID}x{GRID} grid of {side} px cells ({cell} px) leaves no room for {tile} px "
            f"patches jittered by {jitter} px: raise gap_ratio or the image size"
        )
    return tile, jitter


def pixelate(patches: Tensor, prob: float, generator: torch.Generator) -> Tensor:
    """Each uint8 patch (M, C, t, t), with probability ``prob``, resized bilinearly down to
    a side drawn as the code does ("as little as 100 total pixels" of 96 x 96: from 10 / 96
    of the tile, but 2 px at least, a 1 px patch being constant, to tile - 1) and back up."""
    m, tile = len(patches), patches.shape[-1]
    low = max(2.0, tile * 10 / 96)
    if tile - 1 < low:
        return patches  # too small to lose resolution and keep any
    chosen = torch.rand(m, generator=generator) < prob
    u = torch.rand(m, generator=generator)
    sides = (u * ((tile - 1) ** 2 - low**2) + low**2).sqrt().long()
    out = patches.clone()
    for side in sides[chosen].unique().tolist():
        rows = (chosen & (sides == side)).nonzero().flatten().to(patches.device)
        x = patches[rows].float()
        small = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True)
        back = F.interpolate(small, size=(tile, tile), mode="bilinear")
        out[rows] = back.round().clamp(0, 255).to(torch.uint8)
    return out


def project_colours(patches: Tensor) -> Tensor:
    """Multiply every pixel of uint8 RGB patches (..., 3, t, t) by I - a a^T / (a^T a), which
    removes the green-magenta axis a = [-1, 2, -1]. Results reach 170 from mid-grey, so a 3/4
    scale about it fits uint8 unclipped (``forward``'s normalisation undoes the scale)."""
    a = torch.tensor([-1.0, 2.0, -1.0], device=patches.device)
    matrix = torch.eye(3, device=patches.device) - torch.outer(a, a) / a.dot(a)
    x = torch.einsum("ij,...jhw->...ihw", matrix, patches.float())
    return ((x - 127.5) * 0.75 + 127.5).round().clamp(0, 255).to(torch.uint8)


def drop_colours(patches: Tensor, generator: torch.Generator) -> Tensor:
    """Keep one random channel of each uint8 RGB patch (M, 3, t, t) and replace the other two
    with Gaussian noise of 1/100 the kept channel's std (Section 3), about mid-grey. In uint8
    the noise is rounded to whole levels, the scale of the code's uniform +-0.5 noise."""
    m, device = len(patches), patches.device
    keep = torch.randint(0, 3, (m,), generator=generator)
    kept = patches[torch.arange(m, device=device), keep.to(device)].float()
    std = kept.flatten(1).std(dim=1, correction=0).view(m, 1, 1, 1)
    noise = torch.randn(patches.shape, generator=generator).to(device) * std / 100 + 128
    mask = F.one_hot(keep, 3).bool().view(m, 3, 1, 1).to(device)
    return torch.where(mask, patches, noise.round().clamp(0, 255).to(torch.uint8))


def normalise_patches(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """Each patch (..., C, t, t) on its own: every channel's mean removed, then the patch
    divided by its root mean square (the code's mean subtraction and variance normalisation)."""
    x = patches - patches.mean(dim=(-2, -1), keepdim=True)
    return x * torch.rsqrt(x.square().mean(dim=(-3, -2, -1), keepdim=True) + eps)


@dataclass(frozen=True)
class NeighbourPairs:
    """Data-stage transform: each image's centre patch and one random neighbour, labelled by
    the neighbour's position 0..7 (row-major over the 3 x 3 grid, skipping the centre)."""

    gap_ratio: float
    jitter_ratio: float
    pixelate_prob: float
    colour: str

    def __call__(self, views: list[Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        if len(views) != 1:
            raise ValueError(f"context prediction cuts 1 view per image, got {len(views)}")
        (images,) = views  # uint8 (N, C, H, W)
        n, channels, device = len(images), images.shape[1], images.device
        tile, jitter = patch_geometry(min(images.shape[-2:]), self.gap_ratio, self.jitter_ratio)
        # A window of tile + 2 * jitter px centred in each cell; the tile is jittered inside
        # it, so a gap of at least cell - tile - 2 * jitter px always separates neighbours.
        windows = grid_tiles(images, GRID, tile + 2 * jitter, generator, jitter=False)
        position = torch.randint(0, NUM_POSITIONS, (n,), generator=generator)
        cell = (position + (position >= CENTRE).long()).to(device)  # skip the centre cell
        chosen = torch.stack([windows[:, CENTRE], windows[torch.arange(n, device=device), cell]], 1)
        patches = grid_tiles(chosen.flatten(0, 1), 1, tile, generator, jitter=jitter > 0)[:, 0]
        if self.pixelate_prob > 0:
            patches = pixelate(patches, self.pixelate_prob, generator)
        if channels == 3 and self.colour == "projection":
            patches = project_colours(patches)
        elif channels == 3 and self.colour == "drop":
            patches = drop_colours(patches, generator)
        pairs = patches.view(n, 2, *patches.shape[1:])
        return {"view_0": pairs, "target_position": position.to(device)}


class RelativePatch(SSLMethod):
    """Context prediction: one encoder embeds a centre patch and a neighbour, an MLP on the
    two embeddings tells which of the 8 neighbours it is.

    The paper's towers end in fc6 (4096, batch-norm, ReLU), shared; fc7 (4096, BN, ReLU) on
    the concatenation, fc8 (4096, ReLU) and fc9 (8) follow. Here the backbone's pooled
    features feed that stack at ``hidden_dim`` width, batch-norm without scale and shift as in
    the final implementation ("forces the network activations to vary across examples").
    Evaluation uses the backbone's pooled features of whole images.

    Args:
        backbone: a convolutional encoder mapping images to (N, feature_dim) pooled features.
        feature_dim: backbone output dimension.
        gap_ratio: gap between neighbouring patches, in patch sides (paper: 48 / 96 px).
        jitter_ratio: largest shift of each patch, in patch sides (paper: 7 / 96), >= 1 px.
        pixelate_prob: chance that a patch is pixelated (the code's 0.33).
        colour: on RGB images, "projection" (default: frozen-feature evaluation sees all three
            channels, which colour dropping never trains on; the paper finds both similar),
            "drop" (the released code) or "none". 1-channel images are only normalised.
        hidden_dim: width of fc6, fc7 and fc8 (paper: 4096 on AlexNet's 9216-dim pool5).
    """

    num_views: ClassVar[int] = 1
    # Patches are a third of the image or less, no multiple of a ViT's patch size.
    backbones: ClassVar[tuple[str, ...]] = CNN_BACKBONES
    whole_images_first: ClassVar[bool] = False  # the backbone sees tiles

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        gap_ratio: float = 0.5,
        jitter_ratio: float = 7 / 96,
        pixelate_prob: float = 0.33,
        colour: str = "projection",
        hidden_dim: int = 512,
    ) -> None:
        super().__init__(backbone, feature_dim)
        if not 0 <= 2 * jitter_ratio <= gap_ratio:
            raise ValueError(
                f"need gap_ratio >= 2 * jitter_ratio >= 0 (jitter must not close the gap), "
                f"got {gap_ratio} and {jitter_ratio}"
            )
        if not 0 <= pixelate_prob <= 1:
            raise ValueError(f"pixelate_prob must be in [0, 1], got {pixelate_prob}")
        if colour not in COLOURS:
            raise ValueError(f"colour must be one of {COLOURS}, got {colour!r}")
        if hidden_dim < 1:
            raise ValueError(f"hidden_dim must be >= 1, got {hidden_dim}")
        h = hidden_dim
        # No bias before a batch-norm: it would cancel it.
        self.fc6 = nn.Sequential(
            nn.Linear(feature_dim, h, bias=False), nn.BatchNorm1d(h, affine=False), nn.ReLU()
        )
        self.classifier = nn.Sequential(
            nn.Linear(2 * h, h, bias=False), nn.BatchNorm1d(h, affine=False), nn.ReLU(),  # fc7
            nn.Linear(h, h), nn.ReLU(),  # fc8
            nn.Linear(h, NUM_POSITIONS),  # fc9
        )  # fmt: skip

    @classmethod
    def pretext_views(cls, options: Mapping[str, Any]) -> PretextViews:
        names = ("gap_ratio", "jitter_ratio", "pixelate_prob", "colour")
        return NeighbourPairs(**{name: options[name] for name in names})

    def forward(
        self,
        views: list[Tensor],
        indices: Tensor | None = None,
        targets: dict[str, Tensor] | None = None,
    ) -> MethodOutput:
        if len(views) != 1 or views[0].ndim != 5 or views[0].shape[1] != 2:
            raise ValueError("context prediction takes 1 view (N, 2, C, t, t) of patch pairs")
        if targets is None or "position" not in targets:
            raise ValueError("context prediction needs targets['position'] from the data stage")
        pairs, labels = views[0], targets["position"].long()
        n = len(pairs)
        # Patch-major order, one backbone pass: shared weights and batch-norm statistics for
        # both patches, and the first N rows (the online probe's) are the centre patches.
        x = normalise_patches(pairs).transpose(0, 1).flatten(0, 1)
        centre, neighbour = self.fc6(self.backbone(x)).split(n)
        logits = self.classifier(torch.cat([centre, neighbour], dim=1))
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.detach().argmax(1) == labels).float().mean()
        return MethodOutput(loss=loss, logs={"loss": loss.detach(), "pretext_accuracy": accuracy})
