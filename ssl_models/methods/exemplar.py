"""Exemplar CNN (Dosovitskiy, Springenberg, Riedmiller and Brox 2014, "Discriminative
Unsupervised Feature Learning with Convolutional Neural Networks", NIPS 2014, arXiv:1406.6909;
TPAMI version arXiv:1406.6909v2), Section 2.

Every seed image is a surrogate class of its own; the class's samples are the seed under
random compositions of the paper's elementary transformations, drawn per patch:

    for x, i in loader:                 # i: dataset indices = surrogate class labels (N seeds)
        for k in 1..K:                  # the data stage: K transformed patches per seed
            p_k = T(x):  translation  up to 0.2 of the patch side, each axis
                         scaling      of the patch scale by a factor in [0.7, 1.4]
                         rotation     by up to 20 degrees
                         contrast 1   projection of each pixel on each principal component
                                      of all pixels times a factor in [0.5, 2]
                         contrast 2   S and V (HSV) to a power in [0.25, 4], times a factor
                                      in [0.7, 1.4], plus a value in [-0.1, 0.1]
                         colour       hue plus a value in [-0.1, 0.1]
        loss = mean over k of cross_entropy(classifier(f(p_k)), i)   # N-way softmax

Where this differs, and why:
- The paper draws K <= 300 transformations per seed once (a fixed surrogate set); here the
  data stage draws fresh ones every step (two views per seed), so each epoch brings new
  samples of every class; the paper found more samples per class better.
- Its seeds are 32 px patches taken where the gradient is large; here the seed is the image
  and the run's augmentation recipe gives the base crop. Use flips only
  (``augment.crop_scale_min=1``, ``jitter_prob=0``, ``grayscale_prob=0``): these colour
  transformations replace SimCLR's, and the translations and scalings below move the patch
  (random crops on top made the task harder and learned slower on Fashion-MNIST).
  Geometric transformations act on that crop, so the uncovered border is reflected (the
  paper transformed inside the whole image).
- A softmax over thousands of surrogate classes gives each class's weights a gradient only
  when one of its samples is in the batch: with few steps, train with AdamW (SGD kept
  2,000 classes at chance for 150 steps; ``benchmarks/RESULTS.md``).
- The principal components are those of the batch's pixels: the data stage sees a batch,
  not the dataset. The paper gives ranges, not distributions: multiplicative parameters
  (scale, factors, powers) are drawn log-uniformly, additive ones uniformly; S and V get
  their own power, factor and offset.
- 1-channel images are HSV with S = 0 and V = intensity: contrast 2 acts on the intensity,
  and there is no hue to shift; contrast 1 scales deviations from the mean intensity.
"""

from collections.abc import Mapping
from typing import Any

from torch import nn

from ssl_models.losses.classification import classification_loss
from ssl_models.method import Batch, MethodOutput, MethodRequirements, SSLMethod, encode_views
from ssl_models.options import (
    BELOW_ONE,
    NON_NEGATIVE,
    POSITIVE,
    Rule,
    check_options,
    one_of,
    require,
)
from ssl_models.registry import register
from ssl_models.transforms.exemplar import ExemplarTransforms


@register("exemplar")
class ExemplarCNN(SSLMethod):
    """Exemplar CNN: an N-way classifier over the seeds, each seed image its own class.

    Args:
        backbone: encoder mapping images to (N, feature_dim) features.
        feature_dim: backbone output dimension.
        num_images: the number of seeds N = surrogate classes (the paper: 8000-32000; pick
            them with ``data.limit``), supplied by the pipeline.
        hidden_dim: width of the fully connected layer before the softmax (the paper's nets
            end in 128, 512 or 1024 units: 64c5-64c5-128f ... 92c5-256c5-512c5-1024f); 0 for
            a linear classifier on the backbone features.
        dropout: dropout on that layer (the paper uses dropout on its fully connected layers).
        translation, scale_min, scale_max, rotation (degrees), pca_factor (contrast 1 factors
            in [1/f, f]), hsv_power (powers in [1/p, p]), hsv_factor_min, hsv_factor_max,
            hsv_offset (contrast 2), hue_shift (colour): the paper's ranges, its defaults.
        padding: how geometric transformations fill the border (``grid_sample`` mode).
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        num_images: int,
        *,
        hidden_dim: int = 512,
        dropout: float = 0.5,
        translation: float = 0.2,
        scale_min: float = 0.7,
        scale_max: float = 1.4,
        rotation: float = 20.0,
        pca_factor: float = 2.0,
        hsv_power: float = 4.0,
        hsv_factor_min: float = 0.7,
        hsv_factor_max: float = 1.4,
        hsv_offset: float = 0.1,
        hue_shift: float = 0.1,
        padding: str = "reflection",
    ) -> None:
        super().__init__(backbone, feature_dim)
        if num_images < 2:
            raise ValueError(f"num_images (surrogate classes) must be >= 2, got {num_images}")
        # The paper's nets end in a dropout fully connected layer, then the N-way softmax.
        layers: list[nn.Module] = []
        if hidden_dim:
            layers = [
                nn.Linear(feature_dim, hidden_dim),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
            ]
        self.classifier = nn.Sequential(*layers, nn.Linear(hidden_dim or feature_dim, num_images))

    @classmethod
    def validate(cls, options: Mapping[str, Any]) -> None:
        """Ranges of the head and of every transformation's magnitude, and each
        maximum (scale, HSV factor) at least its minimum."""
        at_least_one = Rule(lambda x: x >= 1, ">= 1")
        check_options(
            options,
            hidden_dim=NON_NEGATIVE,
            dropout=BELOW_ONE,
            translation=NON_NEGATIVE,
            scale_min=POSITIVE,
            rotation=NON_NEGATIVE,
            pca_factor=at_least_one,
            hsv_power=at_least_one,
            hsv_factor_min=POSITIVE,
            hsv_offset=NON_NEGATIVE,
            hue_shift=NON_NEGATIVE,
            padding=one_of("zeros", "border", "reflection"),
        )
        for low, high in (("scale_min", "scale_max"), ("hsv_factor_min", "hsv_factor_max")):
            require(options[high] >= options[low], high, f"must be >= {low} ({options[low]})")

    @classmethod
    def requirements(cls, options: Mapping[str, Any]) -> MethodRequirements:
        """Two views per image (the surrogate class's samples), drawn by the data stage's
        random compositions of the paper's transformations, and the images' dataset indices
        (each image is its own class)."""
        names = ExemplarTransforms.__dataclass_fields__
        patches = ExemplarTransforms(**{name: options[name] for name in names})
        return MethodRequirements(global_views=2, image_indices=True, pretext=patches)

    def loss(self, batch: Batch) -> MethodOutput:
        """Cross-entropy over the surrogate classes: every transformed patch of image i
        should be classified as class i."""
        views, indices = batch.views, batch.dataset_indices()
        logits = encode_views(self.backbone, views, self.classifier)  # one pass, views stacked
        labels = indices.repeat(len(views))  # every patch of seed i is class i
        loss, accuracy = classification_loss(logits, labels)
        return MethodOutput(loss=loss, logs={"loss": loss.detach(), "pretext_accuracy": accuracy})
