"""The denoising autoencoder's data stage (Vincent et al. 2008, ICML,
doi:10.1145/1390156.1390294; corruption types from Vincent et al. 2010, JMLR 11:3371-3408):
the corruption q_D acts on each channel value of each pixel independently, ``nu`` being the
fraction of the d = C*H*W components of each example that it destroys.

- masking: exactly round(nu * d) components chosen at random per example are forced to 0;
- salt_pepper: exactly round(nu * d) components chosen at random per example are set to the
  minimum or the maximum value (0 or 255) by a fair coin flip;
- gaussian: additive isotropic noise N(0, sigma^2 I) on every component, rounded and clipped
  back to 0..255 as the images stay uint8 until the loop normalises them; ``sigma`` in the
  paper's [0, 1] intensity units, i.e. 255 * sigma pixel levels.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

CORRUPTIONS = ("masking", "gaussian", "salt_pepper")


@dataclass(frozen=True)
class Corrupt:
    """The data stage's transform: one uint8 view (N, C, H, W) -> ``view_0`` the corrupted
    view, ``view_1`` the clean one, ``target_corrupted`` (N, C, H, W) bool, the components the
    corruption chose (masked or salted ones stay marked where they happened to keep their
    value, as J in the paper is the chosen set)."""

    corruption: str = "masking"
    noise_level: float = 0.25

    def __call__(self, views: list[Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        """Corrupt the one view; returns the keys above."""
        (clean,) = views
        n, device = clean.shape[0], clean.device
        # Random numbers come from the CPU generator (the views may live on the GPU).
        if self.corruption == "gaussian":
            sigma = 255.0 * self.noise_level
            noise = torch.randn(clean.shape, generator=generator).to(device)
            noisy = (clean.float() + sigma * noise).round_().clamp_(0, 255).to(torch.uint8)
            chosen = torch.ones(clean.shape, dtype=torch.bool, device=device)
            return {"view_0": noisy, "view_1": clean, "target_corrupted": chosen}
        # Exactly round(nu * d) components per example: the k largest of d uniform draws are a
        # uniformly random k-subset (topk, unsorted: linear time, unlike a full argsort).
        d = clean[0].numel()
        k = round(self.noise_level * d)
        ids = torch.rand(n, d, generator=generator).topk(k, dim=1, sorted=False).indices
        chosen = torch.zeros(n, d, dtype=torch.bool).scatter_(1, ids, True)
        chosen = chosen.view(clean.shape).to(device)
        if self.corruption == "masking":
            value = torch.zeros((), dtype=torch.uint8, device=device)
        else:  # salt_pepper: a fair coin per component picks the minimum or the maximum
            coin = torch.rand(clean.shape, generator=generator) < 0.5
            value = (coin.to(torch.uint8) * 255).to(device)
        corrupted = torch.where(chosen, value, clean)
        return {"view_0": corrupted, "view_1": clean, "target_corrupted": chosen}
