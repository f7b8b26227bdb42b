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
from typing import Any

from torch import nn

from ssl_models.losses.classification import classification_loss
from ssl_models.method import Batch, MethodOutput, MethodRequirements, SSLMethod
from ssl_models.options import (
    AT_LEAST_ONE,
    BELOW_ONE,
    NON_NEGATIVE,
    PROBABILITY,
    Rule,
    check_options,
)
from ssl_models.patches import standardize_tiles
from ssl_models.registry import register
from ssl_models.transforms.jigsaw import NUM_TILES, ShuffledTiles


@register("jigsaw")
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
    def validate(cls, options: Mapping[str, Any]) -> None:
        """Permutations in [2, 9!], a colour-channel jitter in [0, 0.5), a dropout in
        [0, 1), widths of at least 1, non-negative seed and tile size."""
        check_options(
            options,
            num_permutations=Rule(lambda x: 2 <= x <= math.factorial(NUM_TILES), "in [2, 9!]"),
            permutation_seed=NON_NEGATIVE,
            tile_size=NON_NEGATIVE,
            grayscale_prob=PROBABILITY,
            channel_jitter=Rule(lambda x: 0 <= x < 0.5, "in [0, 0.5)"),
            tile_dim=AT_LEAST_ONE,
            hidden_dim=AT_LEAST_ONE,
            dropout=BELOW_ONE,
        )

    @classmethod
    def requirements(cls, options: Mapping[str, Any]) -> MethodRequirements:
        """One view, which the data stage cuts into 9 tiles and shuffles by one of the
        chosen permutations (``permutation``); the backbone sees tiles, never whole images."""
        names = ("num_permutations", "permutation_seed", "tile_size", "grayscale_prob")
        tiles = ShuffledTiles(
            **{name: options[name] for name in names}, channel_jitter=options["channel_jitter"]
        )
        # The backbone sees tiles, never whole images.
        return MethodRequirements(global_views=1, whole_images_first=False, pretext=tiles)

    def loss(self, batch: Batch) -> MethodOutput:
        """Cross-entropy over the permutation set: which permutation shuffled the tiles."""
        tiles, labels = batch.views[0], batch.target("permutation")
        if tiles.ndim != 5 or tiles.shape[1] != NUM_TILES:
            raise ValueError(f"Jigsaw takes the shuffled tiles (N, 9, C, t, t), got {tiles.shape}")
        n = tiles.shape[0]
        # One backbone pass over all N * 9 tiles: shared weights and batch-norm statistics.
        features = self.backbone(standardize_tiles(tiles).flatten(0, 1))
        fused = self.tile_head(features).view(n, -1)  # row n: tiles 0..8 in shuffled order
        loss, accuracy = classification_loss(self.classifier(fused), labels)
        return MethodOutput(loss=loss, logs={"loss": loss.detach(), "pretext_accuracy": accuracy})
