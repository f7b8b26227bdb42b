"""CIE Lab colour and the quantised ab space of colorization (Zhang et al. 2016, "Colorful
Image Colorization", arXiv:1603.08511, Section 2.1).

- :func:`srgb_to_lab`: sRGB (IEC 61966-2-1) -> CIE XYZ -> CIE L*a*b* under the D65 white.
- :func:`ab_bins`: the ab plane cut into a grid of 10 x 10 cells, keeping the cells that
  some sRGB colour falls into (the paper's "in-gamut" bins).
- :func:`soft_encode`: a colour as weights on its 5 nearest bins, Gaussian in distance.
- :func:`smoothed_distribution` and :func:`rebalancing_weights`: the class-rebalancing
  weights of the paper's eq. 3-4 from counts of the bins seen.

The paper keeps Q = 313 bins (the official ``pts_in_hull.npy``); converting every sRGB colour
and keeping the occupied 10-unit cells gives 261. They span the same range (a in [-90, 100],
b in [-110, 90]); the official set also keeps cells next to the gamut's edge that no sRGB
colour reaches, which only ever receive soft-encoding weight, never a pixel's nearest bin.
"""

import functools

import torch
from torch import Tensor

#: ab grid size: bins are 10 x 10 cells centred on multiples of 10 (the paper's grid).
GRID = 10.0

# sRGB primaries to CIE XYZ (D65), IEC 61966-2-1; its row sums are the D65 white point
# (0.95047, 1, 1.08883), so white maps to a = b = 0 exactly.
_SRGB_TO_XYZ = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)
_DELTA = 6 / 29  # CIE: f(t) is linear below t = delta^3, to avoid the cube root's infinite slope


def srgb_to_lab(rgb: Tensor) -> Tensor:
    """Convert sRGB in [0, 1], shape (..., 3, H, W), to CIE Lab (..., 3, H, W): L in
    [0, 100], a and b roughly in [-110, 110]. Computed in ``rgb``'s floating dtype and device."""
    if rgb.shape[-3] != 3:
        raise ValueError(f"sRGB images need 3 channels, got shape {tuple(rgb.shape)}")
    # Undo the sRGB transfer curve: linear light.
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    matrix = torch.tensor(_SRGB_TO_XYZ, dtype=rgb.dtype, device=rgb.device)
    white = matrix.sum(dim=1)
    xyz = torch.einsum("ij,...jhw->...ihw", matrix / white[:, None], linear)  # X/Xn, Y/Yn, Z/Zn
    f = torch.where(
        xyz > _DELTA**3,
        xyz.clamp_min(_DELTA**3) ** (1 / 3),
        xyz / (3 * _DELTA**2) + 4 / 29,
    )
    fx, fy, fz = f.unbind(dim=-3)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-3)


@functools.lru_cache(maxsize=1)
def _in_gamut_bins() -> Tensor:
    levels = torch.arange(256, dtype=torch.float64) / 255
    face = torch.stack(torch.meshgrid(levels, levels, indexing="ij"))  # (2, 256, 256)
    colours = []
    # Every uint8 colour on the cube's six faces: the ab gamut's boundary is the image of the
    # cube's surface (the map to Lab is smooth and invertible, so interior stays interior)...
    for channel in range(3):
        for value in (0.0, 1.0):
            fixed = torch.full((1, 256, 256), value, dtype=torch.float64)
            colours.append(torch.cat([face[:channel], fixed, face[channel:]]))
    # ... and a coarse interior grid, for cells deep inside that the faces might skip.
    inner = torch.linspace(0, 1, 17, dtype=torch.float64)
    colours.append(torch.stack(torch.meshgrid(inner, inner, inner, indexing="ij")).flatten(2))
    ab = torch.cat([srgb_to_lab(c)[1:].reshape(2, -1) for c in colours], dim=1)
    cells = torch.unique(torch.round(ab / GRID).T, dim=0)  # sorted by a, then b
    return (cells * GRID).float()


def ab_bins() -> Tensor:
    """The in-gamut bin centres (Q, 2), (a, b) pairs sorted by a then b; Q = 261.

    Deterministic: every uint8 sRGB colour on the faces of the RGB cube plus a 17^3 interior
    grid, converted to ab and rounded to the grid; these are exactly the cells that the 256^3
    uint8 colours fall into."""
    return _in_gamut_bins().clone()


def soft_encode(
    ab: Tensor, bins: Tensor, neighbours: int = 5, sigma: float = 5.0, chunk: int = 16384
) -> tuple[Tensor, Tensor]:
    """Soft-encode colours ab (P, 2) on ``bins`` (Q, 2) (the paper's Section 2.1): their
    ``neighbours`` nearest bins, weighted by exp(-d^2 / (2 sigma^2)) and normalised to sum 1.

    Returns (indices, weights), each (P, neighbours), nearest bin first. Sparse, so that
    the (P, Q) target is never built; distances are computed ``chunk`` colours at a time.
    """
    indices, weights = [], []
    bins = bins.to(ab.device, ab.dtype)
    for part in ab.split(chunk):
        squared = (part[:, None, :] - bins[None]).square().sum(dim=-1)  # (p, Q), exact
        nearest, index = squared.topk(neighbours, dim=1, largest=False, sorted=True)
        indices.append(index)
        weights.append(torch.softmax(-nearest / (2 * sigma**2), dim=1))
    return torch.cat(indices), torch.cat(weights)


def smoothed_distribution(counts: Tensor, bins: Tensor, sigma: float = 5.0) -> Tensor:
    """The empirical bin distribution p of ``counts`` (Q,), smoothed over the ab plane with
    a Gaussian kernel of width ``sigma`` (ab units) and renormalised: p~ (Q,). Uniform when
    nothing has been counted yet."""
    counts = counts.double()
    if counts.sum() <= 0:
        return torch.full_like(counts, 1 / counts.numel())
    centres = bins.to(counts.device, torch.float64)
    kernel = torch.exp(-torch.cdist(centres, centres).square() / (2 * sigma**2))
    smoothed = kernel @ (counts / counts.sum())
    return smoothed / smoothed.sum()


def rebalancing_weights(smoothed: Tensor, mix: float = 0.5) -> Tensor:
    """The paper's eq. 4: w proportional to ((1 - lambda) p~ + lambda / Q)^-1, scaled so that
    sum_q p~_q w_q = 1 (the weighted loss keeps the plain loss's scale). ``mix`` is lambda:
    1 gives every bin weight 1, 0 divides by the (smoothed) frequency alone."""
    if not 0.0 < mix <= 1.0:
        raise ValueError(f"the rebalancing mix lambda must be in (0, 1], got {mix}")
    weights = 1.0 / ((1 - mix) * smoothed + mix / smoothed.numel())
    return weights / (smoothed * weights).sum()
