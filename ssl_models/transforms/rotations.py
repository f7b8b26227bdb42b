"""RotNet's data stage (Gidaris, Singh and Komodakis 2018, arXiv:1803.07728): every image in
all four rotations, labelled by the rotation (Section 3.1 finds showing all four in the same
batch better than drawing one per image). Multiples of 90 degrees are flips and transposes,
with no interpolation or border artefacts that would give the rotation away."""

from dataclasses import dataclass

import torch
from torch import Tensor

#: Rotations by 0, 90, 180 and 270 degrees: the paper's four-way task (its Table 2 finds
#: these four better than 2 or 8 rotations).
NUM_ROTATIONS = 4


@dataclass(frozen=True)
class RotatedCopies:
    """Data-stage transform: each image in all four rotations, labelled by the rotation."""

    def __call__(self, views: list[Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        """Rotate the one view four ways."""
        # The generator goes unused: which rotations an image gets is fixed, all four.
        (images,) = views  # uint8 (N, C, H, W)
        if images.shape[-1] != images.shape[-2]:
            raise ValueError(f"RotNet needs square images to stack rotations, got {images.shape}")
        rotated = [torch.rot90(images, y, dims=(-2, -1)) for y in range(NUM_ROTATIONS)]
        copies = torch.stack(rotated, dim=1)
        labels = torch.arange(NUM_ROTATIONS, device=images.device).expand(len(images), -1)
        return {"view_0": copies, "target_rotation": labels.contiguous()}
