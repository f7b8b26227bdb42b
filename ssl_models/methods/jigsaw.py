"""Jigsaw puzzles (Noroozi and Favaro 2016, "Unsupervised Learning of Visual Representations by
Solving Jigsaw Puzzles", arXiv:1603.09246), Section 3 and Algorithm 1:

    P = maximal_hamming_permutations(num_permutations)     # fixed set, chosen once (Alg. 1)
    for x in loader:                                # one augmented view per image
        t_0..t_8 = 3x3 cells of x, one random tile inside each cell   # gaps + jitter
        y ~ U{0, ..., |P| - 1};  view = [t_P[y][0], ..., t_P[y][8]]   # shuffled tiles
        z_j = fc6(f(normalise_per_tile(view_j)))    # shared ("Siamese-ennead") tile encoder
        logits = fc8(fc7(concat(z_0, ..., z_8)))    # late fusion, in the shuffled order
        loss = CE(logits, y)

Order convention: the tile at position j of the shuffled view is original cell ``P[y][j]``
(cells in row-major order), as in the reference loader (bbrattoli/JigsawPuzzlePytorch:
``data = [tiles[perm[t]] for t in range(9)]``).

Against shortcuts (Section 3.3): the paper cuts 64 px tiles at random places in 75 px cells
of a 225 px crop, so tiles never share an edge; here the tile is the same 64/75 of a cell
(8 px in the 9 px cells of a 28 px image). Each tile is normalised by its own per-channel
mean and std (the reference loader's choice; done in ``forward`` since views travel as
uint8, and invariant to the loop's per-channel dataset normalisation). Against chromatic
aberration it "jitters the color channels of each tile by +-0, +-1, +-2 pixels" (scaled
here with the tile: 2/64 of its side, 0 px below 16 px tiles) and mixes in grayscale
images (30% in the reference loader, per image). The paper's only other augmentation is
the random crop of the image, which the run's recipe makes; to match it, set the colour
distortion off (``augment.strength=0``, ``augment.jitter_prob=0``,
``augment.grayscale_prob=0``): the grayscale mix happens here.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models.method import MethodOutput, PretextViews, SSLMethod
from ssl_models.patches import grid_tiles, standardize_tiles

GRID = 3
NUM_TILES = GRID * GRID
#: The paper's tile / cell side: 64 px tiles in 75 px cells.
TILE_FRACTION = 64 / 75


def lexicographic_permutations(items: int) -> np.ndarray:
    """All ``items!`` permutations of range(items) as rows, in lexicographic order
    (``itertools.permutations``' order), built without a Python loop over rows."""
    perms = np.zeros((1, 1), dtype=np.int8)
    for k in range(2, items + 1):
        first = np.repeat(np.arange(k, dtype=np.int8), len(perms))[:, None]
        rest = np.tile(perms, (k, 1))
        perms = np.concatenate([first, rest + (rest >= first)], axis=1)  # skip the first
    return perms


@lru_cache(maxsize=8)
def _hamming_set(size: int, seed: int, items: int) -> np.ndarray:
    candidates = lexicographic_permutations(items)
    n = len(candidates)
    if not 1 <= size <= n:
        raise ValueError(f"cannot choose {size} of the {n} permutations of {items} items")
    columns = np.ascontiguousarray(candidates.T)
    # D-bar of Algorithm 1: each candidate's summed Hamming distance to the chosen set.
    summed = np.zeros(n, dtype=np.int32)
    matches, equal = np.empty(n, dtype=np.uint8), np.empty(n, dtype=bool)
    chosen = np.empty(size, dtype=np.int64)
    j = int(np.random.default_rng(seed).integers(n))  # the first one at random
    for i in range(size):
        chosen[i] = j
        matches[:] = 0
        for k in range(items):  # 9 vector compares instead of a (n, 9) temporary
            np.equal(columns[k], candidates[j, k], out=equal)
            matches += equal
        summed += items - matches.astype(np.int32)
        summed[chosen[: i + 1]] = -1  # each is taken once
        j = int(summed.argmax())  # ties: the lexicographically first, as the reference code
    out = candidates[chosen].astype(np.int64)
    out.flags.writeable = False  # cached: shared by every caller
    return out


def maximal_hamming_permutations(size: int, seed: int = 0, items: int = NUM_TILES) -> Tensor:
    """Algorithm 1: ``size`` permutations of ``items`` tiles, (size, items) int64, chosen
    greedily from all ``items!``: the first at random (``seed``), then each time the one with
    the largest summed (average) Hamming distance to those already chosen. The first
    ``items`` form a Latin square; 100 and 1000 give average distances 8.08 and 8.00."""
    return torch.from_numpy(_hamming_set(size, seed, items).copy())


def _shift_channels(tiles: Tensor, tile: int, shifts: Tensor) -> Tensor:
    """Cut each channel of tiles (N, T, C, B, B) at its own offset ``shifts`` (N, T, C, 2)
    in [0, B - tile]: (N, T, C, tile, tile)."""
    steps = torch.arange(tile, device=tiles.device)
    ys = shifts[..., 0, None, None] + steps[:, None]  # (N, T, C, tile, 1)
    xs = shifts[..., 1, None, None] + steps[None, :]  # (N, T, C, 1, tile)
    n, t, c = (torch.arange(size, device=tiles.device) for size in tiles.shape[:3])
    return tiles[n.view(-1, 1, 1, 1, 1), t.view(1, -1, 1, 1, 1), c.view(1, 1, -1, 1, 1), ys, xs]


@dataclass(frozen=True)
class ShuffledTiles:
    """Data-stage transform: 9 tiles per image, shuffled by a random permutation of the set.

    Returns ``view_0`` (N, 9, C, t, t) uint8 and ``target_permutation`` (N,) int64, the
    permutation's index in ``permutations``.
    """

    permutations: tuple[tuple[int, ...], ...] = field(repr=False)
    tile_size: int = 0
    grayscale_prob: float = 0.3
    channel_jitter: float = 2 / 64

    def __call__(self, views: list[Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        if len(views) != 1:
            raise ValueError(f"Jigsaw cuts exactly 1 view per image into tiles, got {len(views)}")
        (images,) = views  # uint8 (N, C, H, W)
        n, channels, height, width = images.shape
        device = images.device
        cell = min(height, width) // GRID
        tile = self.tile_size or max(1, round(TILE_FRACTION * cell))
        colour = channels == 3
        gray = torch.zeros(n, dtype=torch.bool)
        if colour and self.grayscale_prob > 0:
            gray = torch.rand(n, generator=generator) < self.grayscale_prob
            weights = torch.tensor([0.299, 0.587, 0.114], device=device).view(1, 3, 1, 1)
            luma = (images.float() * weights).sum(1, keepdim=True).round().to(images.dtype)
            images = torch.where(gray.to(device).view(n, 1, 1, 1), luma, images)
        # Channel shifts are cut from a tile 2 * shift larger, so they never leave the cell.
        shift = min(round(self.channel_jitter * tile), (cell - tile) // 2) if colour else 0
        tiles = grid_tiles(images, GRID, tile + 2 * shift, generator)
        if shift:
            offsets = torch.randint(0, 2 * shift + 1, (n, NUM_TILES, 3, 2), generator=generator)
            offsets[gray] = shift  # a grayscale image keeps its channels aligned
            tiles = _shift_channels(tiles, tile, offsets.to(device))
        labels = torch.randint(0, len(self.permutations), (n,), generator=generator)
        order = torch.tensor(self.permutations)[labels].to(device)  # (N, 9)
        shuffled = tiles[torch.arange(n, device=device)[:, None], order]  # position j: order[j]
        return {"view_0": shuffled, "target_permutation": labels.to(device)}


class Jigsaw(SSLMethod):
    """Jigsaw: a shared tile encoder and a late-fusion MLP classify the tiles' permutation.

    The backbone encodes all N * 9 tiles in one pass; fc6 (Linear-ReLU-Dropout) maps each
    tile's pooled features to ``tile_dim``, the 9 are concatenated in the shuffled order, and
    fc7 (``hidden_dim``, ReLU, Dropout) and fc8 give one logit per permutation, as the
    paper's context-free network (fc6 1024 per tile, fc7 4096, dropout 0.5). Evaluation
    features are the backbone's on whole images, as the paper transfers the conv layers.

    Args:
        backbone: encoder mapping images (tiles here) to (N, feature_dim) pooled features.
        feature_dim: backbone output dimension.
        num_permutations: size of the permutation set, the number of classes (1000, the
            set the paper trains with; its Table 2 compares smaller ones, e.g. 100).
        permutation_seed: seed of Algorithm 1's random first permutation; the set is a
            function of (num_permutations, permutation_seed), so data and model agree.
        tile_size: tile side in px; 0 (default) takes the paper's 64/75 of the cell side.
            Set it to a multiple of the patch size for a ViT backbone.
        grayscale_prob: chance an RGB image is turned to grayscale (0.3, reference loader).
        channel_jitter: largest spatial shift of each colour channel of a tile, as a
            fraction of its side (2/64: the paper's +-2 px on 64 px tiles).
        tile_dim: fc6 width per tile (paper 1024 on AlexNet's 2304-d conv5).
        hidden_dim: fc7 width (paper 4096).
        dropout: dropout after fc6 and fc7 (paper 0.5).
    """

    num_views: ClassVar[int] = 1
    whole_images_first: ClassVar[bool] = False  # the backbone sees tiles

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        num_permutations: int = 1000,
        permutation_seed: int = 0,
        tile_size: int = 0,
        grayscale_prob: float = 0.3,
        channel_jitter: float = 2 / 64,
        tile_dim: int = 512,
        hidden_dim: int = 2048,
        dropout: float = 0.5,
    ) -> None:
        super().__init__(backbone, feature_dim)
        if not 2 <= num_permutations <= math.factorial(NUM_TILES):
            raise ValueError(f"num_permutations must be in [2, 9!], got {num_permutations}")
        if tile_size < 0:
            raise ValueError(f"tile_size must be >= 0 (0: 64/75 of a cell), got {tile_size}")
        if not 0.0 <= grayscale_prob <= 1.0:
            raise ValueError(f"grayscale_prob must be in [0, 1], got {grayscale_prob}")
        if not 0.0 <= channel_jitter < 0.5:
            raise ValueError(f"channel_jitter must be in [0, 0.5), got {channel_jitter}")
        if tile_dim < 1 or hidden_dim < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError("tile_dim and hidden_dim must be >= 1 and dropout in [0, 1)")
        self.num_permutations = num_permutations
        self.tile_head = nn.Sequential(
            nn.Linear(feature_dim, tile_dim), nn.ReLU(inplace=True), nn.Dropout(dropout)
        )
        self.classifier = nn.Sequential(
            nn.Linear(NUM_TILES * tile_dim, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, num_permutations),
        )

    @classmethod
    def pretext_views(cls, options: Mapping[str, Any]) -> PretextViews:
        # Chosen once where the plan is built; the tuple pickles to every data worker.
        perms = maximal_hamming_permutations(
            options["num_permutations"], options["permutation_seed"]
        )
        return ShuffledTiles(
            permutations=tuple(map(tuple, perms.tolist())),
            tile_size=options["tile_size"],
            grayscale_prob=options["grayscale_prob"],
            channel_jitter=options["channel_jitter"],
        )

    def forward(
        self,
        views: list[Tensor],
        indices: Tensor | None = None,
        targets: dict[str, Tensor] | None = None,
    ) -> MethodOutput:
        if len(views) != 1 or views[0].ndim != 5 or views[0].shape[1] != NUM_TILES:
            raise ValueError("Jigsaw takes 1 view of shape (N, 9, C, t, t), the shuffled tiles")
        if targets is None or "permutation" not in targets:
            raise ValueError("Jigsaw needs the data stage's labels, targets['permutation']")
        tiles, labels = views[0], targets["permutation"].long()
        n = tiles.shape[0]
        # One backbone pass over all N * 9 tiles: shared weights and batch-norm statistics.
        features = self.backbone(standardize_tiles(tiles).flatten(0, 1))
        fused = self.tile_head(features).view(n, -1)  # row n: tiles 0..8 in shuffled order
        logits = self.classifier(fused)
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.detach().argmax(1) == labels).float().mean()
        return MethodOutput(loss=loss, logs={"loss": loss.detach(), "pretext_accuracy": accuracy})
