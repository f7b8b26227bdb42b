"""Pretext tasks (Methods III): each space adds the one or two knobs its paper ablates to the
shared ones.

- Rotation (Gidaris et al. 2018): a linear or one-hidden-layer classifier.
- Relative patch position (Doersch et al. 2015): the gap between patches, which trades the
  trivial low-level shortcut against how much of the object the pair still shows.
- Context encoder (Pathak et al. 2016): how much of the image the hole covers.
- Denoising autoencoder (Vincent et al. 2010): the corruption type and level, the knobs
  their experiments sweep (nu 0-0.4, sigma 0.05-0.5).
- Jigsaw (Noroozi & Favaro 2016): the size of the permutation set (their Table 2: more
  permutations, and more distant ones, transfer better, up to a point).
- Exemplar CNN (Dosovitskiy et al. 2014): the strength of the transformations, here the
  rotation range and the largest scale, which their ablation finds matter most.
- Colorization (Zhang et al. 2016): the class-rebalancing mix lambda (their ablation
  compares no rebalancing, 0.5 and full rebalancing).
- PIRL (Misra & van der Maaten 2020): the weight lambda between the tiles' and the
  image's term and the temperature, both ablated in the paper.
- CPC (van den Oord et al. 2018): how many rows ahead to predict (Henaff et al. 2019
  ablate the prediction length and direction).
- Multi-task (Doersch & Zisserman 2017): the shared knobs; its tasks and weights are the
  user's design, not a search dimension.
"""

from tune_spaces.common import COMMON, Space

ROTATION: Space = {**COMMON, "method.classifier_hidden_dim": {"choice": [0, 256]}}

RELATIVE_PATCH: Space = {**COMMON, "method.gap_ratio": {"uniform": [0.25, 0.75]}}

CONTEXT_ENCODER: Space = {**COMMON, "method.coverage": {"uniform": [0.15, 0.35]}}

DENOISING_AE: Space = {
    **COMMON,
    "method.corruption": {"choice": ["masking", "salt_pepper", "gaussian"]},
    "method.noise_level": {"uniform": [0.1, 0.4]},
}

JIGSAW: Space = {**COMMON, "method.num_permutations": {"choice": [30, 100, 1000]}}

EXEMPLAR: Space = {
    **COMMON,
    "method.rotation": {"uniform": [0.0, 30.0]},
    "method.scale_max": {"uniform": [1.0, 1.6]},
}

COLORIZATION: Space = {**COMMON, "method.rebalance_mix": {"uniform": [0.25, 1.0]}}

PIRL: Space = {
    **COMMON,
    "method.loss_weight": {"uniform": [0.25, 0.75]},
    "method.temperature": {"loguniform": [0.03, 0.2]},
}

CPC: Space = {**COMMON, "method.prediction_steps": {"choice": [2, 3, 4]}}

MULTITASK: Space = dict(COMMON)
