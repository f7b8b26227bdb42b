"""Batched colour distortion: torchvision's ColorJitter and RandomGrayscale, per sample.

ColorJitter (as SimCLR uses it) draws a brightness, contrast and saturation factor and a hue
shift per image and applies the four ops in a random order, clamping to [0, 1] after each.
Here every sample keeps its own factors and order, but each position in the order is one
batched pass: brightness (f x), contrast (f x + (1 - f) mean(gray)) and saturation
(f x + (1 - f) gray) are all the blend f x + a gray + b with per-sample a and b, so a batch
mixing the three needs no masks or copies; hue runs on just the samples that draw it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

# ITU-R 601-2 luma as torchvision's rgb_to_grayscale writes it (PIL rounds 0.2989 to 0.299).
_LUMA = (0.2989, 0.587, 0.114)


def uniform(n: int, low: float, high: float, gen: torch.Generator) -> Tensor:
    """``n`` draws from U(low, high) on ``gen``'s device."""
    return torch.rand(n, generator=gen) * (high - low) + low


def grayscale(images: Tensor) -> Tensor:
    """Luma of (N, C, H, W) float images as (N, 1, H, W); single-channel images unchanged."""
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def adjust_hue(images: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of RGB images in [0, 1] by ``shift`` (fraction of a turn), per sample.

    Value (max) and chroma (max - min) are kept and only the position on the hue hexagon
    moves, so HSV -> RGB needs no saturation: channel k = max - chroma * clamp(min(t, 4 - t),
    0, 1) with t = (k + 6 h) mod 6. Same result as torchvision's round trip, in fewer passes.
    """
    r, g, b = images.unbind(1)
    maxc = images.amax(1)
    chroma = maxc - images.amin(1)
    # 6 h before the shift, times chroma; grey pixels (chroma 0) get 0 and stay grey.
    scaled = torch.where(
        r == maxc, g - b, torch.where(g == maxc, b - r + 2 * chroma, r - g + 4 * chroma)
    )
    sextant = scaled.div_(chroma.clamp(min=1e-12)).add_(6 * shift.view(-1, 1, 1))
    out = torch.empty_like(images)
    for channel, k in enumerate((5.0, 3.0, 1.0)):
        t = torch.remainder(sextant + k, 6)
        ramp = torch.minimum(t, 4 - t).clamp_(0, 1)
        torch.addcmul(maxc, chroma, ramp, value=-1, out=out[:, channel])
    return out


class JitterRecipe(Protocol):
    """ColorJitter's knobs: the chance a sample is jittered and each op's spread (the view
    recipe, ``ssl_models.transforms.views.ViewRecipe``, is one). Read-only, so a frozen
    dataclass qualifies."""

    @property
    def jitter_prob(self) -> float:
        """The chance that a sample is jittered at all."""

    @property
    def brightness(self) -> float:
        """b: brightness factors are drawn uniformly from [max(0, 1 - b), 1 + b]."""

    @property
    def contrast(self) -> float:
        """c: contrast factors are drawn uniformly from [max(0, 1 - c), 1 + c]."""

    @property
    def saturation(self) -> float:
        """s: saturation factors (RGB only) are drawn uniformly from [max(0, 1 - s), 1 + s]."""

    @property
    def hue(self) -> float:
        """h: hue shifts (RGB only), in turns, are drawn uniformly from [-h, h]."""


@dataclass(frozen=True)
class JitterParams:
    """Per-sample jitter draws for ``ops`` (brightness, contrast[, saturation, hue]).

    ``factors[:, k]`` is op k's factor (for hue: the shift in turns), the identity where a
    sample is not jittered; ``order[:, p]`` is the op that sample applies p-th.
    """

    ops: tuple[str, ...]
    factors: Tensor
    order: Tensor

    def rows(self, start: int, stop: int) -> JitterParams:
        """The draws of samples ``start:stop``."""
        return JitterParams(self.ops, self.factors[start:stop], self.order[start:stop])


def sample_jitter(
    n: int, channels: int, recipe: JitterRecipe, gen: torch.Generator
) -> JitterParams:
    """ColorJitter's draws, applied with probability ``recipe.jitter_prob`` per sample."""
    ops = ("brightness", "contrast") + (("saturation", "hue") if channels == 3 else ())
    apply = torch.rand(n, generator=gen) < recipe.jitter_prob
    columns, identity = [], []
    for name in ops:
        spread = getattr(recipe, name)
        low, high = (-spread, spread) if name == "hue" else (max(0.0, 1 - spread), 1 + spread)
        columns.append(uniform(n, low, high, gen))
        identity.append(0.0 if name == "hue" else 1.0)
    factors = torch.where(apply.view(-1, 1), torch.stack(columns, 1), torch.tensor(identity))
    order = torch.argsort(torch.rand(n, len(ops), generator=gen), dim=1)
    return JitterParams(ops, factors, order)


def apply_jitter(images: Tensor, params: JitterParams) -> Tensor:
    """Apply each sample's jitter ops in its own order to float images in [0, 1]."""
    factors, order = params.factors.to(images.device), params.order.to(images.device)
    code = {name: index for index, name in enumerate(params.ops)}
    for position in range(len(params.ops)):
        op = order[:, position]
        factor = factors.gather(1, op.view(-1, 1)).view(-1)
        is_hue = op == code.get("hue", -1)
        f = torch.where(is_hue, 1.0, factor)
        if bool((f != 1).any()):
            gray = grayscale(images)
            a = torch.where(op == code.get("saturation", -1), 1 - f, 0.0)
            b = torch.where(op == code["contrast"], 1 - f, 0.0) * gray.mean(dim=(1, 2, 3))
            target = torch.addcmul(b.view(-1, 1, 1, 1), gray, a.view(-1, 1, 1, 1))
            images = torch.addcmul(target, images, f.view(-1, 1, 1, 1)).clamp_(0, 1)
        hue = (is_hue & (factor != 0)).nonzero().view(-1)
        if len(hue):
            images[hue] = adjust_hue(images[hue], factor[hue])
    return images


def color_jitter(images: Tensor, recipe: JitterRecipe, gen: torch.Generator) -> Tensor:
    """Draw and apply colour jitter for float images in [0, 1]."""
    return apply_jitter(images, sample_jitter(images.shape[0], images.shape[1], recipe, gen))
