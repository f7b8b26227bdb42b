"""PIRL (Misra & van der Maaten 2020, "Self-Supervised Learning of Pretext-Invariant
Representations", arXiv:1912.01991), with the jigsaw transform, Sections 3-4:

    for x, i in loader:                          # i: the images' dataset indices
        v_I  = augment(x);  tiles = 3x3 jigsaw tiles of augment(x), in a random order
        f    = normalise(W_f backbone(v_I))                                  # 128-d
        g    = normalise(W_c concat_k W_t backbone(tiles_k))        # 9 x 128 -> 128-d
        L    = lambda * L_NCE(m_i, g) + (1 - lambda) * L_NCE(m_i, f)         # eq. 5
        m_i  = normalise(0.5 * m_i + 0.5 * f)        # memory bank: EMA of f, never of g
    L_NCE(m_i, v) = -log h(m_i, v) - sum_{N noise j} log(1 - h(m_j, v))      # eq. 3
    h(m, v) = P / (P + N / |D|),  P = exp(m . v / t) / Z      # eq. 2, Z as in the code

The tiles are the jigsaw pre-processing of Noroozi & Favaro (2016): each cell of a 3x3 grid
yields one tile at a random offset (gaps + jitter against edge-matching shortcuts), 64 px
in an 85 px cell, and every tile is standardised on its own, per channel. Tiles and their
random order are made in the data stage; their order needs no label, as nothing predicts it.
Tiles must suit the backbone: a ViT needs tile sides that are multiples of its patch size.

``objective="nce"`` is eq. 2-3 with Z estimated once, on the first batch, as in the
reference code (VISSL's NCE loss, by the first author). Z then reflects the random initial
bank; on ImageNet most entries stay unvisited for thousands of steps, but a small dataset's
bank fills with the still-similar early features of f within an epoch, every noise entry
looks like data and the f term explodes (on 2048 Fashion-MNIST images it climbs from 7 to
~250 in 100 steps while the tiles' term stalls). So the default is ``"softmax"``: the
cross-entropy of picking m_i among the same 1 + N candidates (VISSL's ``cross_entropy``
option, as InstDisc here). One set of N noise entries is drawn per step and shared by both
terms and the batch (the reference draws N per image): unchanged in expectation, and a
(B, d) x (d, N) product instead of gathering B * N bank rows.
"""

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models.dist import gather_no_grad
from ssl_models.losses.nce import nce_loss
from ssl_models.method import Batch, MethodOutput, MethodRequirements, SSLMethod
from ssl_models.options import (
    AT_LEAST_ONE,
    BELOW_ONE,
    POSITIVE,
    PROBABILITY,
    UP_TO_ONE,
    check_options,
    one_of,
)
from ssl_models.patches import standardize_tiles
from ssl_models.queue import MemoryBank
from ssl_models.registry import register
from ssl_models.transforms.image_and_tiles import JigsawTiles


@register("pirl")
class PIRL(SSLMethod):
    """Pretext-invariant representations with the jigsaw transform and a memory bank.

    Args:
        backbone: encoder mapping images to (N, feature_dim) features.
        feature_dim: backbone output dimension.
        num_images: training-set size, one bank slot per image (supplied by the pipeline).
        embedding_dim: dimension of f, g and the bank (128 in the paper).
        temperature: t in h (0.07 in the paper).
        num_negatives: noise entries N drawn from the bank per step (32000 in the paper).
        bank_momentum: EMA momentum of the bank (0.5 in the paper).
        loss_weight: lambda, the weight of the tiles' term (0.5 in the paper).
        objective: "nce" (the paper's eq. 3) or "softmax" (cross-entropy over the 1 + N
            candidates; the default, see the module docstring).
        grid: tiles per side (3 in the paper: 9 tiles).
        tile_ratio: tile side / grid cell side (64 / 85 px in the paper).
        jitter: place each tile at a random offset in its cell (else centred).
        standardize: standardise each tile on its own (the jigsaw pre-processing).
    """

    normalizer: Tensor  # buffer (): the NCE normaliser Z

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        num_images: int,
        *,
        embedding_dim: int = 128,
        temperature: float = 0.07,
        num_negatives: int = 32000,
        bank_momentum: float = 0.5,
        loss_weight: float = 0.5,
        objective: str = "softmax",
        grid: int = 3,
        tile_ratio: float = 0.75,
        jitter: bool = True,
        standardize: bool = True,
    ) -> None:
        super().__init__(backbone, feature_dim)
        self.temperature, self.num_negatives, self.bank_momentum = (
            temperature,
            num_negatives,
            bank_momentum,
        )
        self.loss_weight, self.objective, self.standardize = loss_weight, objective, standardize
        self.num_tiles = grid * grid
        self.image_head = nn.Linear(feature_dim, embedding_dim)  # f
        self.tile_head = nn.Linear(feature_dim, embedding_dim)  # each tile, shared
        self.jigsaw_head = nn.Linear(self.num_tiles * embedding_dim, embedding_dim)  # g
        self.bank = MemoryBank(num_images, embedding_dim)
        # The NCE normaliser Z; negative until estimated on the first batch (NCE only).
        self.register_buffer("normalizer", torch.tensor(-1.0))

    @classmethod
    def validate(cls, options: Mapping[str, Any]) -> None:
        """Ranges: embedding size and negatives of at least 1, a positive temperature, a
        bank momentum in [0, 1), a loss weight in [0, 1], a known objective, a grid of at least
        1 and a tile ratio in (0, 1]."""
        check_options(
            options,
            embedding_dim=AT_LEAST_ONE,
            temperature=POSITIVE,
            num_negatives=AT_LEAST_ONE,
            bank_momentum=BELOW_ONE,
            loss_weight=PROBABILITY,
            objective=one_of("nce", "softmax"),
            grid=AT_LEAST_ONE,
            tile_ratio=UP_TO_ONE,
        )

    @classmethod
    def requirements(cls, options: Mapping[str, Any]) -> MethodRequirements:
        """Two views and the images' dataset indices: the first view whole, the second
        cut into shuffled jigsaw tiles by the data stage; convolutional backbones only."""
        return MethodRequirements(
            global_views=2,
            image_indices=True,
            # Tiles of 7-64 px: a ViT would need sides that are multiples of its patch size.
            backbone_kinds=("cnn",),
            pretext=JigsawTiles(options["grid"], options["tile_ratio"], options["jitter"]),
        )

    def embed_tiles(self, tiles: Tensor) -> Tensor:
        """g: (N, T, C, t, t) tiles -> (N, embedding_dim), the tiles concatenated in the
        order given (the data stage's random one)."""
        n, count = tiles.shape[:2]
        if count != self.num_tiles:
            raise ValueError(f"PIRL expects {self.num_tiles} tiles per image, got {count}")
        if self.standardize:
            tiles = standardize_tiles(tiles)
        per_tile = self.tile_head(self.backbone(tiles.flatten(0, 1)))  # one backbone pass
        return self.jigsaw_head(per_tile.reshape(n, -1))

    def loss(self, batch: Batch) -> MethodOutput:
        """PIRL's loss (eq. 5): the tiles' and the image's embeddings each against the
        image's memory-bank entry among ``num_negatives`` random ones, mixed by
        ``loss_weight``; then the bank entries move towards the image embeddings."""
        (image, tiles), indices = batch.views, batch.dataset_indices()
        f = F.normalize(self.image_head(self.backbone(image)).float(), dim=1)
        g = F.normalize(self.embed_tiles(tiles).float(), dim=1)
        num_images = self.bank.features.shape[0]
        noise = torch.randint(0, num_images, (self.num_negatives,), device=f.device)
        with torch.no_grad():
            positives, negatives = self.bank.features[indices], self.bank.features[noise]

        def logits(v: Tensor) -> Tensor:  # column 0: the image's own bank entry m_i
            own = (positives * v).sum(1, keepdim=True)
            return torch.cat([own, v @ negatives.T], dim=1) / self.temperature

        # float32 even under autocast: at t = 0.07, bf16's rounding of the similarities
        # would shift the logits by up to ~0.06 and exp() would amplify it.
        with torch.autocast(f.device.type, enabled=False):
            logits_g, logits_f = logits(g), logits(f)
        if self.objective == "softmax":
            own = torch.zeros(len(f), dtype=torch.long, device=f.device)
            loss_g, loss_f = F.cross_entropy(logits_g, own), F.cross_entropy(logits_f, own)
        else:
            scores_g, scores_f = logits_g.exp(), logits_f.exp()
            if self.normalizer < 0:  # Monte Carlo estimate over both terms, all workers
                mean = torch.stack([scores_g.detach().mean(), scores_f.detach().mean()])
                self.normalizer.fill_(float(gather_no_grad(mean).mean()) * num_images)
            loss_g = nce_loss(scores_g, self.normalizer, num_images)
            loss_f = nce_loss(scores_f, self.normalizer, num_images)
        loss = self.loss_weight * loss_g + (1 - self.loss_weight) * loss_f

        # Every worker applies every worker's update, so the banks stay identical.
        self.bank.update(gather_no_grad(indices), gather_no_grad(f.detach()), self.bank_momentum)
        logs = {
            "loss": loss.detach(),
            "loss_tiles": loss_g.detach(),
            "loss_image": loss_f.detach(),
            # Instance discrimination from the tiles: own entry above all N noise entries.
            "pretext_accuracy": (logits_g.detach().argmax(1) == 0).float().mean(),
            "positive_similarity": (positives * g.detach()).sum(1).mean(),
        }
        return MethodOutput(loss=loss, logs=logs)
