"""Noise-contrastive estimation over a memory bank (Wu et al. 2018, arXiv:1805.01978, eq. 5-7).

With n images, m noise samples drawn uniformly (P_noise = 1/n) and P(j | v) = s_j / Z for
the exponentiated similarity s_j = exp(V[j] . v / t), the posterior that j came from the data
is h(j, v) = P(j | v) / (P(j | v) + m / n), and the loss is

    L = -log h(i, v) - sum_{noise j} log(1 - h(j, v)).
"""

import torch
from torch import Tensor


def nce_loss(scores: Tensor, normalizer: float | Tensor, num_images: int) -> Tensor:
    """NCE loss averaged over the batch.

    Args:
        scores: (B, 1 + m) exponentiated similarities; column 0 is each image's own bank
            entry, the other m columns are uniformly drawn noise entries.
        normalizer: the partition-function estimate Z.
        num_images: n, the number of bank entries.
    """
    probability = scores / normalizer
    noise_mass = (scores.shape[1] - 1) / num_images  # m * P_noise
    log_h_data = torch.log(probability[:, 0] / (probability[:, 0] + noise_mass))
    log_one_minus_h_noise = torch.log(noise_mass / (probability[:, 1:] + noise_mass))
    return -(log_h_data + log_one_minus_h_noise.sum(1)).mean()
