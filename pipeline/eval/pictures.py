"""Pictures of what an encoder learned and what its views look like: nearest-neighbour
retrieval grids framed by label agreement (InstDisc, Wu et al. 2018, arXiv:1805.01978,
fig. 4), previews of random SimCLR views (Chen et al. 2020, arXiv:2002.05709, fig. 4), and
features with thumbnails for TensorBoard's embedding projector.

Grids scale each image by ``scale`` (nearest neighbour: each source pixel a sharp square)
inside a ``BORDER``-wide frame; slots are ``PAD`` apart and from the edge, plus ``GAP`` after
the first column; every function documents its exact PNG size in these constants.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tensorboardX import SummaryWriter
from tensorboardX.embedding import TB_MAX_SPRITE_SIZE
from torch import Tensor

from ssl_models.transforms.views import ViewRecipe, random_views

BORDER = 3
PAD = 4
GAP = 12
BACKGROUND = (255, 255, 255)
FIRST_FRAME = (128, 128, 128)  # the query / the original
MATCH = (0, 170, 0)
MISMATCH = (220, 0, 0)


def _check_images(name: str, pixels: np.ndarray, ndim: int) -> None:
    if not (isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.ndim == ndim):
        raise ValueError(f"{name} must be a uint8 numpy array with {ndim} dimensions")
    if pixels.shape[-3] not in (1, 3):
        raise ValueError(f"{name} has {pixels.shape[-3]} channels; expected 1 or 3")


def _tile(image: np.ndarray, scale: int) -> Image.Image:
    rgb = np.broadcast_to(image, (3, *image.shape[1:])).transpose(1, 2, 0)  # grey -> RGB
    tile = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    return tile.resize((tile.width * scale, tile.height * scale), Image.Resampling.NEAREST)


def _grid(
    rows: list[list[np.ndarray]], frames: list[list[tuple]], scale: int, path: str | Path
) -> Path:
    """Save (C, h, w) images, row by row, framed in ``frames``, as an RGB PNG at ``path``."""
    if scale < 1 or not rows or len(rows[0]) < 2:
        raise ValueError(f"need at least one row of two images and scale >= 1, got {scale}")
    box_h, box_w = (max(img.shape[d] for row in rows for img in row) * scale for d in (1, 2))
    slot_h, slot_w = box_h + 2 * BORDER, box_w + 2 * BORDER
    width = PAD + len(rows[0]) * (slot_w + PAD) + GAP
    height = PAD + len(rows) * (slot_h + PAD)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for r, (row, row_frames) in enumerate(zip(rows, frames, strict=True)):
        for c, (image, frame) in enumerate(zip(row, row_frames, strict=True)):
            tile = _tile(image, scale)
            # Smaller images sit centred in their slot, framed tightly.
            left = PAD + c * (slot_w + PAD) + (GAP if c else 0) + (box_w - tile.width) // 2
            top = PAD + r * (slot_h + PAD) + (box_h - tile.height) // 2
            right, bottom = left + tile.width + 2 * BORDER - 1, top + tile.height + 2 * BORDER - 1
            draw.rectangle((left, top, right, bottom), fill=frame)
            canvas.paste(tile, (left + BORDER, top + BORDER))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path


def retrieval_grid(
    query_pixels: np.ndarray,
    neighbour_pixels: np.ndarray,
    path: str | Path,
    *,
    scale: int = 2,
    query_labels: Sequence[int] | np.ndarray | None = None,
    neighbour_labels: np.ndarray | None = None,
) -> Path:
    """PNG of each query (Q, C, H, W) beside its k neighbours (Q, k, C, H, W), one row each.

    Queries get a grey frame. With ``query_labels`` (Q,) and ``neighbour_labels`` (Q, k),
    a neighbour is framed ``MATCH`` green when its label equals its query's and ``MISMATCH``
    red otherwise; without labels its frame is background. The PNG is RGB,
    ``PAD + (k + 1) * (W * scale + 2 * BORDER + PAD) + GAP`` by
    ``PAD + Q * (H * scale + 2 * BORDER + PAD)`` pixels.
    """
    _check_images("query_pixels", query_pixels, 4)
    _check_images("neighbour_pixels", neighbour_pixels, 5)
    queries, k = neighbour_pixels.shape[:2]
    if queries != len(query_pixels) or neighbour_pixels.shape[2:] != query_pixels.shape[1:]:
        raise ValueError(
            f"neighbour_pixels {neighbour_pixels.shape} must be (Q, k, C, H, W) with the Q, C, "
            f"H, W of query_pixels {query_pixels.shape}"
        )
    frames = [[BACKGROUND] * k for _ in query_pixels]
    if query_labels is not None or neighbour_labels is not None:
        # A missing one becomes a 0-d array, so giving only one fails the shape check.
        query_labels, neighbour_labels = np.asarray(query_labels), np.asarray(neighbour_labels)
        if query_labels.shape != (queries,) or neighbour_labels.shape != (queries, k):
            raise ValueError(
                f"query_labels {query_labels.shape} and neighbour_labels "
                f"{neighbour_labels.shape} must be ({queries},) and ({queries}, {k})"
            )
        same = neighbour_labels == query_labels[:, None]
        frames = [[MATCH if s else MISMATCH for s in row] for row in same]
    rows = [[q, *n] for q, n in zip(query_pixels, neighbour_pixels, strict=True)]
    frames = [[FIRST_FRAME, *f] for f in frames]
    return _grid(rows, frames, scale, path)


def nearest_neighbours(
    query_features: Tensor, bank_features: Tensor, k: int, exclude_self: bool
) -> Tensor:
    """Indices (Q, k) of each query's k most cosine-similar bank rows, most similar first.

    With ``exclude_self``, query i is taken to be bank row i (the queries are the first Q
    bank rows) and never returned as its own neighbour, even when a duplicate image is.
    """
    shapes = tuple(query_features.shape), tuple(bank_features.shape)
    if len(shapes[0]) != 2 or len(shapes[1]) != 2 or shapes[0][1] != shapes[1][1]:
        raise ValueError(
            f"query_features {shapes[0]} and bank_features {shapes[1]} must be "
            "(N, D) matrices with the same D"
        )
    available = len(bank_features) - int(exclude_self)
    if not 1 <= k <= available or (exclude_self and len(query_features) > len(bank_features)):
        raise ValueError(
            f"need 1 <= k <= {available} bank rows (k={k}), and with exclude_self the "
            "queries must be the first rows of the bank"
        )
    queries = F.normalize(query_features.float(), dim=1)
    bank = F.normalize(bank_features.float().to(queries.device), dim=1)
    similarity = queries @ bank.T
    if exclude_self:
        rows = torch.arange(len(queries), device=similarity.device)
        similarity[rows, rows] = -math.inf
    return similarity.topk(k, dim=1).indices


def augmentation_preview(
    pixels: np.ndarray,
    recipes: Sequence[ViewRecipe],
    views: int,
    path: str | Path,
    *,
    seed: int = 0,
    scale: int = 2,
) -> Path:
    """PNG of each image (N, C, H, W) beside ``views`` random views, column j drawn with
    ``recipes[j % len(recipes)]`` (so every kind of view shows: BYOL's two global views,
    DINO's local crops).

    The same seed gives the same PNG bytes. The PNG is RGB,
    ``PAD + (views + 1) * (max(W, size) * scale + 2 * BORDER + PAD) + GAP`` by
    ``PAD + N * (max(H, size) * scale + 2 * BORDER + PAD)`` pixels (size = the largest
    recipe's); smaller views sit centred in their slot.
    """
    if not recipes:
        raise ValueError("need at least one view recipe")
    _check_images("pixels", pixels, 4)
    gen = torch.Generator().manual_seed(seed)
    # On the CPU: a handful of images is instant, and the bytes then match on any machine.
    images = torch.from_numpy(np.ascontiguousarray(pixels))
    drawn = [
        random_views(images, recipes[column % len(recipes)], gen).numpy() for column in range(views)
    ]
    rows = [[image, *(d[i] for d in drawn)] for i, image in enumerate(pixels)]
    frames = [[FIRST_FRAME] + [BACKGROUND] * views for _ in rows]
    return _grid(rows, frames, scale, path)


def add_projector(
    writer: SummaryWriter,
    features: Tensor,
    labels: Sequence[int | str] | np.ndarray | Tensor | None,
    pixels: np.ndarray,
    tag: str,
    step: int,
) -> None:
    """Log features (N, D) with labels and square uint8 thumbnails (N, C, S, S) for the
    TensorBoard projector: ``projector_config.pbtxt`` in the log dir, tensors, metadata and
    ``sprite.png`` under ``<step:05d>/<tag>/``. TensorBoard loads sprites up to 8192 px wide.
    """
    _check_images("pixels", pixels, 4)
    if features.ndim != 2 or len(features) != len(pixels):
        raise ValueError(
            f"features {tuple(features.shape)} must be (N, D) with N = {len(pixels)} images"
        )
    sprite = math.ceil(math.sqrt(len(pixels))) * pixels.shape[3]
    if pixels.shape[2] != pixels.shape[3] or sprite > TB_MAX_SPRITE_SIZE:
        raise ValueError(
            f"projector thumbnails must be square and make a sprite of at most "
            f"{TB_MAX_SPRITE_SIZE} px; {len(pixels)} of {pixels.shape[2:]} make {sprite} px"
        )
    if labels is not None:
        labels = labels.tolist() if isinstance(labels, Tensor | np.ndarray) else list(labels)
        if len(labels) != len(pixels):
            raise ValueError(f"{len(labels)} labels for {len(pixels)} images")
    images = torch.from_numpy(np.ascontiguousarray(pixels)).float() / 255
    mat = features.detach().float().cpu()
    writer.add_embedding(mat, metadata=labels, label_img=images, global_step=step, tag=tag)
