"""What the commands that read a trained run share: finding its checkpoint and recording
evaluation results in its eval.json."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported lazily at run time, so that --help stays fast
    from pipeline.eval.evaluate import EvalContext


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory or file as given, else the run directory's latest checkpoint
    (local paths and object-storage URIs alike)."""
    from pipeline.data import locations
    from pipeline.train.checkpoint import CHECKPOINT_FILE, latest_checkpoint

    path = locations.absolute(path)
    if locations.is_file(locations.join(path, CHECKPOINT_FILE)) or locations.is_file(path):
        return path
    return latest_checkpoint(path)


def save_results(
    checkpoint: str, context: EvalContext, results: dict, run: str | None = None
) -> None:
    """Merge protocol results into the run's eval.json (the checkpoint's parent, or ``run``)."""
    from pipeline.data import locations
    from pipeline.eval.report import write_eval

    write_eval(
        run or locations.parent(checkpoint),
        {
            "protocols": results,
            "method": context.config.method_name,
            "backbone": f"{context.config.model.backbone} w{context.config.model.width:g}",
            "epochs": int(context.state.epoch),
        },
    )
