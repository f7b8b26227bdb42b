"""Compare runs by every evaluation protocol: a Markdown table and a grouped bar chart.

SSL methods are compared on several protocols because they rank differently on each
(Goyal et al. 2019, arXiv:1905.01235; Ericsson et al. 2021, arXiv:2011.13377): kNN on frozen
features, a linear probe, and fine-tuning on 1% and 10% of the labels (the semi-supervised
protocol of SimCLR, Chen et al. 2020, arXiv:2002.05709).

On-disk contract: a run directory holds ``eval.json``::

    {"protocols": {"knn": {"top1": 0.71, "top5": 0.95}, "linear": {"top1": 0.74}, ...},
     "method": "simclr", "backbone": "resnet18", "epochs": 100}

Accuracies (``top1``, ``top5``, ``val_top1``) are fractions in [0, 1]; every protocol has at
least ``top1``, and may name the settings it used as numbers >= 0 (fine-tuning's ``lr`` and
``weight_decay``). ``write_eval`` merges new results into it; ``build_report`` reads it from
each run.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.data import locations

EVAL_FILE = "eval.json"
FIGSIZE = (8.0, 4.5)  # inches; the PNG is FIGSIZE * DPI pixels
DPI = 100
_META = {"method": str, "backbone": str, "epochs": int}


def _is_metric(key: str, value: Any) -> bool:
    """An accuracy (a ``top`` key) in [0, 1], or a setting >= 0."""
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    return is_number and value >= 0 and ("top" not in key or value <= 1)


def _check(results: Any, where: str) -> None:
    """Raise ValueError unless ``results`` follows the eval.json contract."""
    if not isinstance(results, dict):
        raise ValueError(f"{where}: eval results must be a JSON object")
    for key, kind in _META.items():
        value = results.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise ValueError(f"{where}: {key!r} must be of type {kind.__name__}, got {value!r}")
    protocols = results.get("protocols", {})
    if not isinstance(protocols, dict):
        raise ValueError(f"{where}: 'protocols' must map protocol names to metrics")
    for name, metrics in protocols.items():
        if not (
            isinstance(metrics, dict)
            and "top1" in metrics
            and all(_is_metric(key, value) for key, value in metrics.items())
        ):
            raise ValueError(
                f"{where}: protocol {name!r} needs 'top1', accuracies in [0, 1] and settings "
                f">= 0, got {metrics!r}"
            )


def read_eval(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """A run's eval.json (a local run directory or an object-storage URI), checked;
    ValueError naming the run when missing or malformed."""
    path = locations.join(run_dir, EVAL_FILE)
    try:
        text = locations.read_text(path)
    except (FileNotFoundError, locations.LocationError) as err:
        raise ValueError(f"run {run_dir}: no {EVAL_FILE}; evaluate the run first") from err
    try:
        results = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    _check(results, str(path))
    return results


def write_eval(run_dir: str | os.PathLike[str], results: dict[str, Any]) -> str:
    """Merge ``results`` (eval.json's shape) into the run's eval.json; returns its location.

    A protocol in ``results`` replaces that protocol's old metrics whole (a rerun's numbers
    are not mixed with the last run's); other protocols and absent fields are kept. The file
    is replaced atomically (``locations.write_text``: a local rename, or an object that
    appears only once complete), so a reader never sees half of it. Concurrent writers to
    one run are not serialised: the last one's merge wins. A local run directory must exist;
    an object-storage run is any prefix.
    """
    if not locations.is_remote(run_dir) and not locations.is_dir(run_dir):
        raise ValueError(f"run directory {run_dir} does not exist")
    _check(results, f"results for {run_dir}")
    path = locations.join(run_dir, EVAL_FILE)
    merged = read_eval(run_dir) if locations.exists(path) else {}
    protocols = {**merged.get("protocols", {}), **results.get("protocols", {})}
    merged.update(results)
    merged["protocols"] = protocols
    locations.write_text(path, json.dumps(merged, indent=2) + "\n")
    return path


def _table(names: list[str], runs: list[dict[str, Any]], protocols: list[str]) -> str:
    """Markdown: one row per run, top-1 per protocol to 4 decimals, each column's best bold."""
    # Compare rounded values, so runs that print the same are bold together.
    best = {
        p: max(round(run["protocols"][p]["top1"], 4) for run in runs if p in run["protocols"])
        for p in protocols
    }

    def cell(run: dict[str, Any], protocol: str) -> str:
        if protocol not in run["protocols"]:
            return "-"
        top1 = round(run["protocols"][protocol]["top1"], 4)
        return f"**{top1:.4f}**" if top1 == best[protocol] else f"{top1:.4f}"

    header = ["run", *_META, *protocols]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---|---:|" + "---:|" * len(protocols)]
    for name, run in zip(names, runs, strict=True):
        row = [
            name,
            *("-" if run.get(key) is None else str(run[key]) for key in _META),
            *(cell(run, p) for p in protocols),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _chart(names: list[str], runs: list[dict[str, Any]], protocols: list[str], path: str) -> None:
    """Grouped bars: protocols along x, one bar per run; a run lacking a protocol has none."""
    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / len(runs)
    for i, (name, run) in enumerate(zip(names, runs, strict=True)):
        offset = (i - (len(runs) - 1) / 2) * width
        xs = [x + offset for x, p in enumerate(protocols) if p in run["protocols"]]
        tops = [run["protocols"][p]["top1"] for p in protocols if p in run["protocols"]]
        bars = axes.bar(xs, tops, width, label=name)
        axes.bar_label(bars, fmt="%.2f", fontsize=7)
    axes.set_xticks(range(len(protocols)), protocols, rotation=30, ha="right", fontsize=8)
    axes.set_xlabel("evaluation protocol")
    axes.set_ylabel("top-1 accuracy")
    axes.set_ylim(0, 1.05)
    axes.legend(title="run", loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=DPI, format="png")
    locations.write_bytes(path, buffer.getvalue())


def build_report(
    run_dirs: list[str | os.PathLike[str]], out_dir: str | os.PathLike[str]
) -> tuple[str, str]:
    """Compare runs (local directories or object-storage URIs) by every protocol any of
    them was evaluated on.

    Returns the Markdown table (one row per run, named as given; one top-1 column per
    protocol in order of first appearance; "-" where a run lacks it; best per column in bold)
    and the location of ``report.png`` (FIGSIZE * DPI pixels); writes both, and
    ``report.md`` (the table under a caption, above the chart), into ``out_dir`` (a local
    directory or a URI).
    """
    if not run_dirs:
        raise ValueError("build_report needs at least one run directory")
    names = [str(d) for d in run_dirs]
    if len(set(names)) != len(names):
        raise ValueError(f"a run directory is listed twice: {names}")
    runs = [read_eval(d) for d in run_dirs]
    protocols = list(dict.fromkeys(p for run in runs for p in run["protocols"]))
    if not protocols:
        raise ValueError(f"no run in {names} has any protocol results in {EVAL_FILE}")
    table = _table(names, runs, protocols)
    chart = locations.join(out_dir, "report.png")
    _chart(names, runs, protocols, chart)
    caption = "Top-1 accuracy by evaluation protocol (best per column in bold).\n\n"
    locations.write_text(
        locations.join(out_dir, "report.md"),
        f"{caption}{table}\n![top-1 by protocol](report.png)\n",
    )
    return table, chart
