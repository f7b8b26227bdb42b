"""Ray Tune sweeps: each trial is one full pretraining run, scored every epoch by its online
kNN top-1 on a labelled validation split (never the test set), and ASHA stops weak trials.

Train V2 pattern: a function trainable fits one ``TorchTrainer`` per trial, and Ray's
``TuneReportCallback`` forwards rank 0's per-epoch metrics to Tune. A trial that errors is
retried (its Train run resumes from its last checkpoint) and, if it still fails, reported
in the table. Everything a sweep writes lives in ``<run.root>/sweeps/<name>/``:

    results.csv, results.parquet   one row per trial: parameters, epochs, best metric,
                                   status and failed attempts
    metric_vs_params.png           the metric against each searched parameter
    best_config.yaml               the best trial's full config; `pretrain --config` takes it
    trials/                        each trial's Train run (checkpoints, TensorBoard)

With ``run.trackers`` naming mlflow or wandb, Tune's own logger callbacks record each trial
as one run (its parameters, every epoch's metrics) in one MLflow experiment / W&B project,
``run.experiment``; the trials' own pretraining then keeps only TensorBoard.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from pipeline.cluster import init_ray
from pipeline.config import (
    SAFE_NAME_RULE,
    Config,
    absolute_tracking_uri,
    check_trackers_installed,
    from_dict,
    is_safe_name,
    set_value,
    to_yaml,
    with_absolute_paths,
)
from pipeline.data import locations
from pipeline.data.shards import validate_shards
from tune_spaces import Space, SpaceError, check_space, to_tune

METRIC = "knn_top1"
SEARCHERS = ("random", "optuna")


@dataclass
class SweepSettings:
    """How to search: ``samples`` trials, ``search`` algorithm, ASHA's first rung after
    ``grace_epochs``, at most ``concurrency`` trials at once (None: derived from the
    cluster), ``retries`` per errored trial."""

    samples: int = 16
    search: str = "random"
    grace_epochs: int = 1
    concurrency: int | None = None
    retries: int = 1
    name: str | None = None  # default: "<run.name>-sweep"


def sweep_dir(config: Config, settings: SweepSettings) -> str:
    """Where the sweep's Tune state, trials and results go: a local directory, or a prefix
    in object storage when ``run.root`` is a bucket URI."""
    root = with_absolute_paths(config).run.root
    return locations.join(root, "sweeps", settings.name or f"{config.run.name}-sweep")


def trial_concurrency(config: Config, cluster: dict[str, float]) -> int:
    """Trials that fit at once: each needs its Train workers plus one CPU kept free for its
    Ray Data stage, else the workers hold every CPU and the data stage never runs."""
    per_trial = config.train.num_workers * config.train.cpus_per_worker + 1
    fits = int(cluster.get("CPU", 1) // per_trial)
    if config.train.use_gpu:
        fits = min(fits, int(cluster.get("GPU", 0) // config.train.num_workers))
    return max(1, fits)


def _run_trial(params: dict[str, Any], base: dict[str, Any], trials_root: str) -> None:
    """One trial: the base config with this trial's parameters, pretrained through Train."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.cluster import configure_data_context
    from pipeline.train.driver import pretrain

    values = copy.deepcopy(base)
    for key, value in params.items():
        set_value(values, key, value)
    values["run"].update(name=f"trial-{tune.get_context().get_trial_id()}", root=trials_root)
    # The sweep's callbacks log this trial as one MLflow / W&B run; a second, opened by the
    # trial's pretraining, would split it in two.
    values["run"]["trackers"] = [t for t in values["run"]["trackers"] if t == "tensorboard"]
    configure_data_context()
    pretrain(from_dict(values), callbacks=[TuneReportCallback()])


def _check_sweep(
    config: Config, base: dict[str, Any], space: Space, settings: SweepSettings
) -> None:
    """Raise on bad settings, a space that can draw a bad config (``base`` is the config as
    dicts) or bad shards: before Ray starts."""
    if settings.search not in SEARCHERS:
        raise SpaceError(f"search must be one of {SEARCHERS}, got '{settings.search}'")
    if settings.samples < 1 or settings.grace_epochs < 1 or settings.retries < 0:
        raise SpaceError("samples and grace epochs must be >= 1 and retries >= 0")
    if settings.name is not None and not is_safe_name(settings.name):
        raise SpaceError(f"sweep name {settings.name!r} must be {SAFE_NAME_RULE}")
    if config.train.online_knn_bank == 0:
        raise SpaceError("train.online_knn_bank is 0: a sweep needs the online kNN metric")
    check_space(space, base, from_dict)
    for shard_dir in dict.fromkeys([config.data.train, config.data.eval_train]):
        validate_shards(shard_dir)


def _new_tuner(
    trainable: Callable[..., Any],
    config: Config,
    space: Space,
    settings: SweepSettings,
    directory: str,
    concurrency: int,
    callbacks: Sequence[tune.Callback],
) -> tune.Tuner:
    """A fresh sweep's Tuner: ``settings.search`` draws the trials, ASHA stops weak ones."""
    searcher = None
    if settings.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=config.run.seed)
    return tune.Tuner(
        trainable,
        param_space=to_tune(space),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            num_samples=settings.samples,
            search_alg=searcher,
            scheduler=ASHAScheduler(
                time_attr="epoch",
                max_t=config.train.epochs,
                grace_period=min(settings.grace_epochs, config.train.epochs),
                reduction_factor=2,
            ),
            max_concurrent_trials=concurrency,
        ),
        run_config=tune.RunConfig(
            name=locations.name(directory),
            storage_path=locations.parent(directory),
            failure_config=tune.FailureConfig(max_failures=settings.retries),
            callbacks=list(callbacks),
            verbose=1,
        ),
    )


def sweep(
    config: Config,
    space: Space,
    settings: SweepSettings,
    *,
    resume: bool = False,
    callbacks: Sequence[tune.Callback] = (),
) -> list[dict[str, Any]]:
    """Run (or with ``resume``, finish) a sweep; return its rows, best first.

    The space and the settings are checked before Ray starts, so a bad sweep costs nothing.
    """
    config = with_absolute_paths(config)
    check_trackers_installed(config)
    base = config.to_dict()
    _check_sweep(config, base, space, settings)
    directory = sweep_dir(config, settings)
    if resume and not tune.Tuner.can_restore(directory):
        raise FileNotFoundError(f"no sweep to resume at {directory}")

    init_ray()
    trainable = tune.with_resources(
        tune.with_parameters(
            _run_trial, base=base, trials_root=locations.join(directory, "trials")
        ),
        {"CPU": 0.01},  # the trial function only waits on its Train controller (0 is refused)
    )
    if resume:
        tuner = tune.Tuner.restore(directory, trainable, resume_errored=True)
    else:
        concurrency = settings.concurrency or trial_concurrency(config, ray.cluster_resources())
        # A restored sweep brings back its callbacks, the trackers' among them.
        callbacks = [*callbacks, *tracker_callbacks(config, directory)]
        tuner = _new_tuner(trainable, config, space, settings, directory, concurrency, callbacks)
        print(
            f"sweep {locations.name(directory)}: {settings.samples} trials, {concurrency} at a time"
        )
    grid = tuner.fit()
    rows = result_rows(grid, list(space), config.train.epochs)
    write_results(rows, list(space), base, directory)
    unfinished = settings.samples - sum(not r["status"].startswith("unfinished") for r in rows)
    if unfinished:
        print(f"sweep interrupted with {unfinished} trials to go; finish it with --resume")
    return rows


def tracker_callbacks(config: Config, directory: str) -> list[tune.Callback]:
    """Tune's MLflow and W&B loggers for the trackers ``run.trackers`` names: each trial one
    run, in experiment / project ``run.experiment``, tagged or grouped by the sweep's name."""
    from pipeline.train.trackers import wandb_settings

    run, sweep_name = config.run, locations.name(directory)
    callbacks: list[tune.Callback] = []
    if "mlflow" in run.trackers:
        from pipeline.tune.mlflow_trials import OneRunPerTrial

        callbacks.append(
            OneRunPerTrial(
                absolute_tracking_uri(run.tracking_uri),
                experiment_name=run.experiment,
                tags={"sweep": sweep_name},
            )
        )
    if "wandb" in run.trackers:
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(
            WandbLoggerCallback(
                project=run.experiment,
                group=sweep_name,
                **wandb_settings(directory),
            )
        )
    return callbacks


def result_rows(grid: tune.ResultGrid, keys: list[str], max_epochs: int) -> list[dict]:
    """One row per trial, best metric first; errored and unfinished trials say so."""
    rows = []
    # ResultGrid keeps its trials in result order; their status is not on the Result.
    trials = grid._experiment_analysis.trials
    # ResultGrid iterates through __getitem__, which mypy does not count as iterable.
    results = [grid[i] for i in range(len(grid))]
    for result, trial in zip(results, trials, strict=True):
        history = result.metrics_dataframe
        scores = history[METRIC].dropna() if history is not None and METRIC in history else []
        epochs = int(history["epoch"].max()) if history is not None and len(scores) else 0
        if result.error is not None:
            status = f"ERROR: {type(result.error).__name__}"
        elif trial.status != "TERMINATED":
            status = "unfinished (resume the sweep)"
        elif epochs < max_epochs:
            status = "stopped early (ASHA)"
        else:
            status = "completed"
        params = result.config or {}
        rows.append(
            {
                "trial": trial.trial_id,
                **{key: params.get(key) for key in keys},
                "epochs": epochs,
                f"best_{METRIC}": float(max(scores)) if len(scores) else math.nan,
                "status": status,
                "failures": trial.num_failures,  # attempts that errored, retries included
            }
        )
    rows.sort(key=lambda r: -r[f"best_{METRIC}"] if not math.isnan(r[f"best_{METRIC}"]) else 1)
    return rows


def write_results(rows: list[dict], keys: list[str], base: dict, directory: str) -> None:
    """The table (printed, CSV, Parquet), the plot and the best trial's config, written into
    ``directory`` (local or object storage)."""
    import pandas as pd

    table = pd.DataFrame(rows)
    locations.write_text(locations.join(directory, "results.csv"), table.to_csv(index=False))
    parquet = io.BytesIO()
    table.to_parquet(parquet, index=False)
    locations.write_bytes(locations.join(directory, "results.parquet"), parquet.getvalue())
    with pd.option_context("display.max_columns", None, "display.width", 200):
        print(table.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    plot = io.BytesIO()
    plot_metric(table, keys, plot)
    locations.write_bytes(locations.join(directory, "metric_vs_params.png"), plot.getvalue())
    scored = [r for r in rows if not math.isnan(r[f"best_{METRIC}"])]
    if not scored:
        print("no trial reported a metric; no best config written")
        return
    best = copy.deepcopy(base)
    for key in keys:
        set_value(best, key, _plain(scored[0][key]))
    best["run"]["name"] = f"{locations.name(directory)}-best"
    locations.write_text(locations.join(directory, "best_config.yaml"), to_yaml(from_dict(best)))
    print(f"best trial {scored[0]['trial']}: {METRIC} {scored[0][f'best_{METRIC}']:.4f}")
    print(f"results, plot and best config in {directory}/")


def _plain(value: Any) -> Any:
    """A numpy scalar as a Python number (anything else unchanged), so the YAML stays plain."""
    return value.item() if hasattr(value, "item") else value


def plot_metric(table: Any, keys: list[str], path: Any) -> None:
    """One panel per searched parameter: each trial's best metric against its value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
    for axis, key in zip(axes[0], keys, strict=True):
        axis.scatter(table[key], table[f"best_{METRIC}"])
        values = table[key].dropna()
        if len(values) and (values > 0).all() and values.max() / values.min() > 20:
            axis.set_xscale("log")
        axis.set_xlabel(key)
        axis.set_ylabel(f"best {METRIC}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
