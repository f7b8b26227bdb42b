"""The evaluation protocols on one checkpoint, each next to its random-init baseline.

- ``knn``: weighted kNN on frozen features (pipeline.eval.evaluate), with the raw-pixel floor.
- ``linear``: a linear classifier on frozen features (pipeline.eval.linear_probe), with the
  raw-pixel floor.
- ``finetune``: the backbone fine-tuned end to end on class-balanced 1% and 10% label
  subsets of the train split (pipeline.eval.finetune; SimCLR v2's semi-supervised protocol):
  from the projection head's first layer where the method has one, and, given several
  learning rates or weight decays, with the pair that scores best on a validation split
  drawn from the rest of the train split (the test split never chooses).

Every protocol also runs on the same architecture with random weights (the run's seed), so a
table shows what pretraining added. Results are keyed like eval.json's ``protocols``
(pipeline.eval.report): ``knn``, ``linear``, ``finetune_1pct``, ..., ``<name>_random_init``, and
the raw-pixel floors ``knn_raw_pixels`` and ``linear_raw_pixels``; with another dataset's
splits (transfer) every key gets ``@<dataset>``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray.data
import torch

from pipeline.data.ingest import decoded_dataset
from pipeline.eval.evaluate import KNN_ENCODERS, EvalContext, KNNReport, evaluate_checkpoint
from pipeline.eval.finetune import (
    balanced_subset,
    decoded_rows,
    finetune_accuracy_streamed,
    subset_rows,
)
from pipeline.eval.linear_probe import linear_probe_accuracy_streamed
from ssl_models.method import SSLMethod

PROTOCOLS = ("knn", "linear", "finetune")
FINETUNE_STARTS = ("head", "backbone")
# The frozen features each protocol reads (fine-tuning trains the backbones on images).
PROTOCOL_ENCODERS = {
    "knn": KNN_ENCODERS,
    "linear": ("trained", "random_init", "raw_pixels"),
    "finetune": (),
}


@dataclass(frozen=True)
class ProtocolSettings:
    """Each protocol's knobs; ``None`` for k/temperature means the run's eval section."""

    k: int | None = None
    temperature: float | None = None
    probe_epochs: int = 100
    probe_lr: float = 0.1
    fractions: tuple[float, ...] = (0.01, 0.1)
    finetune_epochs: int = 30
    finetune_lrs: tuple[float, ...] = (0.05,)
    finetune_weight_decays: tuple[float, ...] = (0.0,)
    #: "head": SimCLR v2's start, the projection head's first layer (SSLMethod.finetune_start);
    #: "backbone": the backbone alone.
    finetune_from: str = "head"
    #: The class-balanced share of the train split held out to choose fine-tuning settings
    #: by, when there is more than one pair to choose from.
    validation_fraction: float = 0.1
    probe_shuffle_buffer: int = 65536  # rows of features the probe's shuffle buffer holds
    device: str = "cuda" if torch.cuda.is_available() else "cpu"

    def __post_init__(self) -> None:
        if self.finetune_from not in FINETUNE_STARTS:
            raise ValueError(
                f"finetune_from must be one of {FINETUNE_STARTS}, got {self.finetune_from!r}"
            )

    def finetune_grid(self) -> list[tuple[float, float]]:
        """Every (learning rate, weight decay) pair fine-tuning tries."""
        return [(lr, wd) for lr in self.finetune_lrs for wd in self.finetune_weight_decays]


def fraction_name(fraction: float) -> str:
    """0.01 -> 'finetune_1pct', 0.1 -> 'finetune_10pct'."""
    return f"finetune_{fraction * 100:g}pct"


def label_subsets(context: EvalContext, fractions: tuple[float, ...]) -> dict[str, list[str]]:
    """Each fine-tuning fraction's class-balanced image ids of the train split (seeded by
    run.seed), drawn from the split's ids and labels alone."""
    seed = context.config.run.seed
    ids, labels = context.train_ids_labels
    return {fraction_name(f): [ids[i] for i in balanced_subset(labels, f, seed)] for f in fractions}


def validation_ids(
    context: EvalContext, subsets: dict[str, list[str]], fraction: float
) -> list[str]:
    """A class-balanced ``fraction`` of the train split (seeded by run.seed + 1) drawn from
    the images in none of the label ``subsets``: what fine-tuning settings are chosen by."""
    ids, labels = context.train_ids_labels
    taken = {image_id for subset in subsets.values() for image_id in subset}
    rest = np.array([i for i, image_id in enumerate(ids) if image_id not in taken], dtype=int)
    if len(rest) == 0:
        raise ValueError(
            "the label subsets use the whole train split, so no validation split is left to "
            "choose fine-tuning settings by: give one learning rate and one weight decay"
        )
    picked = balanced_subset(labels[rest], fraction, context.config.run.seed + 1)
    return [ids[i] for i in rest[picked]]


def finetune_splits(context: EvalContext, settings: ProtocolSettings) -> dict[str, list[str]]:
    """Fine-tuning's image ids: each label fraction's subset and, when the settings' grid
    has more than one pair to choose from, the ``validation`` split that chooses."""
    subsets = label_subsets(context, settings.fractions)
    if len(settings.finetune_grid()) > 1:
        return subsets | {
            "validation": validation_ids(context, subsets, settings.validation_fraction)
        }
    return subsets


def knn_results(report: KNNReport) -> dict[str, dict[str, float]]:
    """A kNN report's rows keyed as in eval.json (the floors when the report has them)."""
    keys = ("knn", "knn_raw_pixels", "knn_random_init")
    return {
        key: {"top1": row.top1, "top5": row.top5}
        for key, row in zip(keys, report.rows, strict=False)
    }


def run_protocols(
    context: EvalContext, protocols: list[str], settings: ProtocolSettings, suffix: str = ""
) -> dict[str, dict[str, float]]:
    """Run ``protocols`` on the context's splits; returns {key: {"top1", "top5", ...}}.

    Features stream from the context (every encoder the protocols need computed in one
    pass per split, shared by kNN and the probe); fine-tuning streams the subset's and the
    test split's images through Ray Data. No split is held in this process."""
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown:
        raise ValueError(f"unknown protocol(s) {unknown}; choose from {list(PROTOCOLS)}")
    context.request(e for protocol in protocols for e in PROTOCOL_ENCODERS[protocol])
    results: dict[str, dict[str, float]] = {}
    if "knn" in protocols:
        report = evaluate_checkpoint(
            context, floors=True, k=settings.k, temperature=settings.temperature
        )
        results.update(knn_results(report))
    if "linear" in protocols:
        results.update(linear_results(context, settings))
    if "finetune" in protocols:
        results.update(finetune_results(context, settings))
    return {f"{key}{suffix}": value for key, value in results.items()}


def linear_results(context: EvalContext, settings: ProtocolSettings) -> dict[str, dict[str, float]]:
    """The linear probe on the trained features and on both floors', keyed as in eval.json."""
    return {
        f"linear{tag}": linear_probe_accuracy_streamed(
            context.features(encoder, "train"),
            context.features(encoder, "test"),
            context.num_classes,
            epochs=settings.probe_epochs,
            lr=settings.probe_lr,
            seed=context.config.run.seed,
            device=settings.device,
            shuffle_buffer=settings.probe_shuffle_buffer,
        )
        for tag, encoder in (
            ("", "trained"),
            ("_random_init", "random_init"),
            ("_raw_pixels", "raw_pixels"),
        )
    }


def finetune_results(
    context: EvalContext, settings: ProtocolSettings
) -> dict[str, dict[str, float]]:
    """Fine-tuning of the trained and the random-init network on each label fraction's
    subset, keyed as in eval.json (``finetune_1pct``, ``finetune_1pct_random_init``, ...);
    each result also names the learning rate and weight decay it used and, when they were
    chosen, the validation top-1 that chose them."""
    from pipeline.cluster import init_ray

    subsets = finetune_splits(context, settings)
    val_ids = subsets.pop("validation", None)
    if not subsets:
        return {}
    init_ray()
    validation = None
    if val_ids is not None:
        validation = decoded_rows(subset_rows(context.train_dir, val_ids), context.spec)
    test = decoded_dataset(context.test_dir, context.spec)
    encoders: dict[str, SSLMethod] = {"": context.method, "_random_init": context.untrained}
    results: dict[str, dict[str, float]] = {}
    for name, ids in subsets.items():
        train = (subset_rows(context.train_dir, ids), len(ids))
        for tag, method in encoders.items():
            results[f"{name}{tag}"] = _best_finetune(
                f"{name}{tag}", context, settings, method, train, test, validation
            )
    return results


def _best_finetune(
    key: str,
    context: EvalContext,
    settings: ProtocolSettings,
    method: SSLMethod,
    train: tuple[ray.data.Dataset, int],
    test: ray.data.Dataset,
    validation: ray.data.Dataset | None,
) -> dict[str, float]:
    """``method`` fine-tuned on the ``train`` rows (and their count) with each pair of the
    settings' grid; the test accuracy of the pair with the best validation top-1 (the only
    pair's, without a validation split), with that pair. Each try is printed under ``key``."""
    start, width = (
        method.finetune_start()
        if settings.finetune_from == "head"
        else (method.backbone, method.feature_dim)
    )
    tries = []
    for lr, weight_decay in settings.finetune_grid():
        result = finetune_accuracy_streamed(
            start, width, *train, test, context.spec, context.num_classes, *context.mean_std,
            epochs=settings.finetune_epochs, lr=lr, weight_decay=weight_decay,
            seed=context.config.run.seed, device=settings.device, validation=validation,
        )  # fmt: skip
        tries.append(result | {"lr": lr, "weight_decay": weight_decay})
        if validation is not None:
            print(
                f"{key}: lr {lr:g}, weight decay {weight_decay:g}: validation top-1 "
                f"{result['val_top1']:.4f}, test top-1 {result['top1']:.4f}",
                flush=True,
            )
    return max(tries, key=lambda result: result.get("val_top1", 0.0))


def results_table(results: dict[str, dict[str, float]]) -> str:
    """One line per protocol: pretrained top-1/top-5 next to the random-init top-1."""
    width = max(len(key) for key in results)
    lines = [f"{'protocol':<{width}}  top-1   top-5   random-init top-1", "-" * (width + 36)]
    for key, value in results.items():
        if "_random_init" in key:
            continue
        base, _, suffix = key.partition("@")
        floor = results.get(f"{base}_random_init{'@' + suffix if suffix else ''}")
        top5 = f"{value['top5']:.4f}" if "top5" in value else "  -   "
        lines.append(
            f"{key:<{width}}  {value['top1']:.4f}  {top5}  {floor['top1']:.4f}"
            if floor
            else f"{key:<{width}}  {value['top1']:.4f}  {top5}  -"
        )
    return "\n".join(lines)
