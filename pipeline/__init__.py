"""The pipeline around ssl_models: data preparation, Ray Train pretraining, evaluation,
export, sweeps and the command line.

``from pipeline import load_encoder`` gives a run's trained encoder and its preprocessing
(pipeline.export.encoder); it is imported on first use, so ``import pipeline`` stays light.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    """``load_encoder``, imported from pipeline.export.encoder when first asked for."""
    if name == "load_encoder":
        from pipeline.export.encoder import load_encoder

        return load_encoder
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


__all__ = ["load_encoder"]
