"""The config's view recipes: what the data stage (or the training device) draws per image.

The CLI's augmentation preview shows :func:`view_recipe`; the driver and the workers use
:func:`view_plan`, the method's views plus its pretext transform.
"""

from __future__ import annotations

from dataclasses import asdict, replace

from pipeline.config import Config
from pipeline.data.ingest import ViewPlan
from ssl_models.transforms.views import ViewRecipe


def view_recipe(config: Config, size: int) -> ViewRecipe:
    """The augment section's SimCLR recipe at ``size`` px (wherever the views are drawn)."""
    options = asdict(config.augment)
    # The keys that say where views are drawn and how many local ones, not what each looks like.
    for key in [key for key in options if key == "on_train_device" or key.startswith("local_")]:
        del options[key]
    return ViewRecipe.simclr(size, **options)


def view_recipes(config: Config, size: int) -> list[ViewRecipe]:
    """One recipe per view the method takes: its global views at ``size`` px, then the
    augment section's multi-crop local views (same recipe, smaller side and crop area)."""
    augment = config.augment
    full = view_recipe(config, size)
    # SwAV and DINO pair 224 px global with 96 px local crops.
    local_side = augment.local_size or max(4, round(size * 96 / 224))
    local = replace(
        full,
        size=local_side,
        crop_scale=(augment.local_crop_scale_min, augment.local_crop_scale_max),
    )
    views = config.method_requirements.global_views
    return [full] * views + [local] * augment.local_crops


def view_plan(config: Config, size: int) -> ViewPlan:
    """The data stage's work per image: :func:`view_recipes`, then the method's pretext
    transform if it is a pretext task."""
    pretext = config.method_requirements.pretext
    return ViewPlan(tuple(view_recipes(config, size)), pretext)
