"""Tune's ``MLflowLoggerCallback``, keeping one MLflow run per trial when a sweep resumes.

Its own keeps the trial -> run map in memory only, so a restored sweep that restarts an
unfinished trial opens a second run for it, and it steps by Tune's training iteration, which
starts again with the restarted trial. This one finds the trial's earlier run by the
``trial_name`` tag the callback sets, and logs each result at ``step=epoch``, as a
pretraining run's trackers do (pipeline.train.trackers).
"""

from __future__ import annotations

from typing import Any

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.experiment import Trial


class OneRunPerTrial(MLflowLoggerCallback):
    """``MLflowLoggerCallback`` with one run per trial across resumes, stepped by epoch."""

    def log_trial_start(self, trial: Trial) -> None:
        """Reuse the trial's run from before the sweep was interrupted, if it has one."""
        if trial not in self._trial_runs:
            earlier = self.mlflow_util._get_client().search_runs(
                [self.mlflow_util.experiment_id], f"tags.trial_name = '{trial}'"
            )
            if earlier:
                self._trial_runs[trial] = earlier[0].info.run_id
        super().log_trial_start(trial)

    def log_trial_result(self, iteration: int, trial: Trial, result: dict[str, Any]) -> None:
        """The trial's reported metrics at ``step=epoch``."""
        self.mlflow_util.log_metrics(
            run_id=self._trial_runs[trial], metrics_to_log=result, step=int(result["epoch"])
        )
