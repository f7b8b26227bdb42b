"""The config's view recipes: what the data stage (or the training device) draws per image.

Each view has its own recipe: the augment section's keys, overridden by that view's entry of
``augment.views`` or, without one, of the method's paper recipe (BYOL's asymmetric pair).
The CLI's augmentation preview shows :func:`view_recipes`; the driver and the workers use
:func:`view_plan`, the method's views plus its pretext transform.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from pipeline.config import VIEW_KEYS, Config
from pipeline.data.ingest import ViewPlan
from ssl_models.transforms.views import ViewRecipe


def view_recipe(
    config: Config, size: int, settings: Mapping[str, float] | None = None
) -> ViewRecipe:
    """The augment section's SimCLR recipe at ``size`` px (wherever the views are drawn),
    with one view's ``settings`` (augment.views entries) over the section's keys."""
    options = {key: getattr(config.augment, key) for key in VIEW_KEYS}
    return ViewRecipe.simclr(size, **(options | dict(settings or {})))


def view_settings(config: Config) -> tuple[Mapping[str, float], ...]:
    """The per-view settings in force: ``augment.views``, else the method's paper recipe,
    else none (every view as the augment section says)."""
    if config.augment.views is not None:
        return tuple(config.augment.views)
    return config.method_requirements.views or ()


def view_recipes(config: Config, size: int) -> list[ViewRecipe]:
    """One recipe per view the method takes: its global views at ``size`` px, each with its
    own settings, then the multi-crop local views (smaller side and crop area, the local
    settings when the list has an entry past the global views)."""
    augment = config.augment
    count = config.method_requirements.global_views
    settings = view_settings(config)
    per_view = [settings[i] if i < len(settings) else None for i in range(count + 1)]
    # SwAV and DINO pair 224 px global with 96 px local crops.
    local_side = augment.local_size or max(4, round(size * 96 / 224))
    local = replace(
        view_recipe(config, size, per_view[count]),
        size=local_side,
        crop_scale=(augment.local_crop_scale_min, augment.local_crop_scale_max),
    )
    return [view_recipe(config, size, per_view[i]) for i in range(count)] + [
        local
    ] * augment.local_crops


def view_plan(config: Config, size: int) -> ViewPlan:
    """The data stage's work per image: :func:`view_recipes`, then the method's pretext
    transform if it is a pretext task."""
    pretext = config.method_requirements.pretext
    return ViewPlan(tuple(view_recipes(config, size)), pretext)
