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
from typing import Any

import torch
from torch import nn

from ssl_models.losses.classification import classification_loss
from ssl_models.method import Batch, MethodOutput, MethodRequirements, SSLMethod
from ssl_models.options import AT_LEAST_ONE, PROBABILITY, check_options, one_of, require
from ssl_models.patches import normalise_patches
from ssl_models.registry import register
from ssl_models.transforms.neighbour_pairs import COLOURS, NUM_POSITIONS, NeighbourPairs


@register("relative_patch")
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
    def validate(cls, options: Mapping[str, Any]) -> None:
        """A pixelation probability in [0, 1], a known colour handling, a width of at
        least 1, a jitter >= 0 and a gap of at least twice the jitter."""
        check_options(
            options, pixelate_prob=PROBABILITY, colour=one_of(*COLOURS), hidden_dim=AT_LEAST_ONE
        )
        gap, jitter = options["gap_ratio"], options["jitter_ratio"]
        require(jitter >= 0, "jitter_ratio", f"must be >= 0, got {jitter}")
        require(
            gap >= 2 * jitter,
            "gap_ratio",
            f"must be >= 2 * jitter_ratio (jitter must not close the gap), got {gap} and {jitter}",
        )

    @classmethod
    def requirements(cls, options: Mapping[str, Any]) -> MethodRequirements:
        """One view, which the data stage turns into a centre patch and a random
        neighbour with its position; convolutional backbones only, which see patches."""
        names = ("gap_ratio", "jitter_ratio", "pixelate_prob", "colour")
        return MethodRequirements(
            global_views=1,
            # Patches are a third of the image or less, no multiple of a ViT's patch size.
            backbone_kinds=("cnn",),
            whole_images_first=False,  # the backbone sees patches
            pretext=NeighbourPairs(**{name: options[name] for name in names}),
        )

    def loss(self, batch: Batch) -> MethodOutput:
        """Cross-entropy over the 8 positions: where the neighbour lies relative to the
        centre patch."""
        pairs, labels = batch.views[0], batch.target("position")
        if pairs.ndim != 5 or pairs.shape[1] != 2:
            raise ValueError(
                f"context prediction takes patch pairs (N, 2, C, t, t), got {pairs.shape}"
            )
        n = len(pairs)
        # Patch-major order, one backbone pass: shared weights and batch-norm statistics for
        # both patches, and the first N rows (the online probe's) are the centre patches.
        x = normalise_patches(pairs).transpose(0, 1).flatten(0, 1)
        centre, neighbour = self.fc6(self.backbone(x)).split(n)
        logits = self.classifier(torch.cat([centre, neighbour], dim=1))
        loss, accuracy = classification_loss(logits, labels)
        return MethodOutput(loss=loss, logs={"loss": loss.detach(), "pretext_accuracy": accuracy})
