"""What the commands that read a trained run share: recording evaluation results in its
eval.json and its trackers."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported lazily at run time, so that --help stays fast
    from pipeline.eval.evaluate import EvalContext


def save_results(
    checkpoint: str, context: EvalContext, results: dict, run: str | None = None
) -> None:
    """Merge protocol results into the run's eval.json (the checkpoint's parent, or ``run``)
    and log them into the run's MLflow / W&B runs (its config's run.trackers)."""
    from pipeline.data import locations
    from pipeline.eval.report import write_eval
    from pipeline.train.trackers import log_evaluation

    run_dir = run or locations.parent(checkpoint)
    epoch = int(context.state.epoch)
    config = context.config
    eval_file = write_eval(
        run_dir,
        {
            "protocols": results,
            "method": config.method_name,
            "backbone": f"{config.model.backbone} w{config.model.width:g}",
            "epochs": epoch,
        },
    )
    log_evaluation(run_dir, config, results, epoch, eval_file)
