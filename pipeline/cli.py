"""Command line: ``python -m pipeline {prepare,pretrain,evaluate,tune,demo}`` (also
``ray-ssl``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEMO_CONFIG = CONFIGS / "fmnist_simclr_demo.yaml"

DESCRIPTION = """\
Self-supervised pretraining of image encoders on Ray.

Typical session:
  python -m pipeline prepare fashion-mnist            # IDX files -> Parquet shards (once)
  python -m pipeline pretrain --config configs/fmnist_simclr.yaml
  python -m pipeline evaluate --checkpoint runs/fmnist-simclr --floors
  python -m pipeline tune --config configs/fmnist_simclr.yaml --space simclr --samples 16
  python -m pipeline demo                              # all of the above, small and quick

Run `python -m pipeline COMMAND --help` for each command's options.
"""


def _add_config_args(parser: argparse.ArgumentParser, default: Path | None) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=default,
        help=f"YAML preset (sections run, data, augment, model, method, train, eval); "
        f"default: {default.relative_to(CONFIGS.parent) if default else 'built-in defaults'}",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set train.epochs=5 --set method.temperature=0.2 "
        "(repeatable; values are parsed as YAML)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prep = commands.add_parser(
        "prepare",
        help="convert an image source into Parquet shards",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Convert an image source into Parquet shards (columns id, image, label, source) plus a
manifest.json. Cached: a split whose manifest exists is reused unless --overwrite.

SOURCE is one of:
  fashion-mnist      Debian package dataset-fashion-mnist (IDX files); train + test splits
  mnist              MNIST IDX files under --root; train + test splits
  cifar10:DIR        CIFAR-10 python batches (data_batch_1..5, test_batch); train + test
  folder:DIR         an image folder; first-level sub-folders are classes (optional)
  parquet:PATH       existing Parquet with an `image` column (and optional id, label)

Examples:
  python -m pipeline prepare fashion-mnist
  python -m pipeline prepare folder:~/photos --out data/shards/photos --split train
""",
    )
    prep.add_argument("source", help="what to convert (see above)")
    prep.add_argument("--out", type=Path, help="output directory (default data/shards/NAME)")
    prep.add_argument(
        "--root", type=Path, help="directory holding IDX files (fashion-mnist, mnist)"
    )
    prep.add_argument("--split", default="train", help="split name for folder/parquet sources")
    prep.add_argument("--rows-per-shard", type=int, default=4096)
    prep.add_argument("--overwrite", action="store_true", help="rewrite existing shards")

    pre = commands.add_parser(
        "pretrain",
        help="self-supervised pretraining with Ray Train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Pretrain an encoder without labels. Ray Data decodes and augments the training shards into
two random views per image on CPU workers; Ray Train runs train.num_workers DDP workers.
A checkpoint is written every epoch under RUN.ROOT/RUN.NAME/; starting the same run name
again resumes from its latest checkpoint (raise train.epochs to train further).
TensorBoard: tensorboard --logdir runs/

Examples:
  python -m pipeline pretrain --config configs/fmnist_simclr.yaml
  python -m pipeline pretrain --config configs/fmnist_simclr.yaml \\
      --set run.name=longer --set train.epochs=20 --set train.batch_size=512
""",
    )
    _add_config_args(pre, CONFIGS / "fmnist_simclr.yaml")
    pre.add_argument("--no-eval", action="store_true", help="skip the final kNN evaluation")

    ev = commands.add_parser(
        "evaluate",
        help="kNN evaluation of a checkpoint's frozen features",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Weighted kNN on frozen backbone features: the train split (data.eval_train) is the memory
bank, the test split (data.eval_test) the queries; cosine similarity, votes weighted by
exp(sim / T). --floors adds raw pixels and a random-init encoder for comparison.

Examples:
  python -m pipeline evaluate --checkpoint runs/fmnist-simclr --floors
  python -m pipeline evaluate --checkpoint runs/fmnist-simclr/checkpoint_2026-... --k 20
""",
    )
    ev.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="a run directory (its latest checkpoint is used) or one checkpoint directory",
    )
    ev.add_argument("--floors", action="store_true", help="also score raw pixels and random init")
    ev.add_argument("--k", type=int, help="neighbours (default: the run's eval.knn_k)")
    ev.add_argument(
        "--temperature", type=float, help="vote temperature (default eval.knn_temperature)"
    )

    sweep = commands.add_parser(
        "tune",
        help="hyperparameter sweep with Ray Tune (ASHA on online kNN top-1)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Search hyperparameters: every trial is a full pretraining run on the config with the trial's
values filled in. Each epoch a trial reports kNN top-1 on a labelled validation split taken
from data.eval_train (train.online_knn_bank images as the bank, the next
train.online_knn_queries as queries; never the test set), and ASHA stops the weak ones.

Spaces live in tune_spaces/ (one per method: `--space simclr`, `--space byol`, ...); a
distribution is one of {loguniform: [lo, hi]}, {uniform: [lo, hi]}, {randint: [lo, hi]},
{choice: [a, b]}. Override keys from a YAML file (--space-file) or one by one
(--space-set); `null` drops a key. Bad spaces stop before any trial starts.

Writes RUN.ROOT/sweeps/NAME/: results.csv and .parquet (one row per trial), a PNG of the
metric against each parameter, and best_config.yaml that `pretrain --config` accepts.
An interrupted sweep (Ctrl-C, lost driver) finishes with the same command plus --resume.

Examples:
  python -m pipeline tune --config configs/fmnist_simclr.yaml --space simclr --samples 16
  python -m pipeline tune --space byol --search optuna --set method.name=byol \\
      --space-set 'method.base_momentum={uniform: [0.95, 0.999]}'
  python -m pipeline tune --config configs/fmnist_simclr.yaml --space simclr --resume
""",
    )
    _add_config_args(sweep, CONFIGS / "fmnist_simclr.yaml")
    sweep.add_argument("--space", required=True, help="search space name (see tune_spaces/)")
    sweep.add_argument("--space-file", type=Path, help="YAML of keys overriding the space")
    sweep.add_argument(
        "--space-set",
        action="append",
        default=[],
        metavar="KEY=DISTRIBUTION",
        help="override one key, e.g. 'method.temperature={loguniform: [0.05, 0.3]}'",
    )
    sweep.add_argument("--samples", type=int, default=16, help="trials to run (default 16)")
    sweep.add_argument(
        "--search", choices=["random", "optuna"], default="random", help="search algorithm"
    )
    sweep.add_argument(
        "--grace-epochs", type=int, default=1, help="epochs before ASHA may stop a trial"
    )
    sweep.add_argument(
        "--concurrency",
        type=int,
        help="trials at once (default: what the cluster's CPUs/GPUs fit, see README)",
    )
    sweep.add_argument("--retries", type=int, default=1, help="re-runs of an errored trial")
    sweep.add_argument("--name", help="sweep name (default: RUN.NAME-sweep)")
    sweep.add_argument("--resume", action="store_true", help="finish an interrupted sweep")

    demo = commands.add_parser(
        "demo",
        help="prepare Fashion-MNIST, pretrain SimCLR briefly, print the kNN table",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
The quick start: prepares Fashion-MNIST shards (once), starts a local Ray cluster,
pretrains SimCLR with 2 Ray Train workers (about 10 minutes on a 2-core laptop), then
prints kNN top-1 on the 10k test images next to the raw-pixel and random-init floors.
""",
    )
    _add_config_args(demo, DEMO_CONFIG)
    return parser


def _resolve_checkpoint(path: Path) -> Path:
    from pipeline.checkpoint import CHECKPOINT_FILE, latest_checkpoint

    return path if (path / CHECKPOINT_FILE).is_file() or path.is_file() else latest_checkpoint(path)


def _evaluate(checkpoint: Path, floors: bool, k: int | None, temperature: float | None) -> str:
    from pipeline.evaluate import evaluate_checkpoint

    checkpoint = _resolve_checkpoint(checkpoint)
    report = evaluate_checkpoint(checkpoint, floors=floors, k=k, temperature=temperature)
    return f"checkpoint: {checkpoint}\n{report.table()}"


def _pretrain(config_path: Path | None, overrides: list[str], floors: bool, evaluate: bool) -> None:
    from pipeline.config import load_config
    from pipeline.train import pretrain, run_dir

    config = load_config(config_path, overrides)
    result = pretrain(config)
    print(f"run directory: {run_dir(config)}")
    if evaluate and result.checkpoint is not None:
        # as_directory fetches a checkpoint kept in object storage into a local temp dir.
        with result.checkpoint.as_directory() as local:
            table = _evaluate(Path(local), floors, None, None)
        print(table.replace(local, result.checkpoint.path))
        if "://" not in config.run.root:
            (Path(run_dir(config)) / "knn.txt").write_text(table + "\n")


def _tune(args: argparse.Namespace) -> None:
    from pipeline.config import load_config
    from pipeline.sweep import SweepSettings, sweep
    from tune_spaces import load_space

    config = load_config(args.config, args.overrides)
    space = load_space(args.space, args.space_file, args.space_set)
    settings = SweepSettings(
        samples=args.samples,
        search=args.search,
        grace_epochs=args.grace_epochs,
        concurrency=args.concurrency,
        retries=args.retries,
        name=args.name,
    )
    sweep(config, space, settings, resume=args.resume)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from pipeline.config import ConfigError
    from pipeline.shards import ShardError
    from pipeline.sources import SourceError
    from tune_spaces import SpaceError

    try:
        if args.command == "prepare":
            from pipeline.prepare import prepare

            for split, manifest in prepare(
                args.source,
                args.out,
                root=args.root,
                split=args.split,
                rows_per_shard=args.rows_per_shard,
                overwrite=args.overwrite,
            ).items():
                print(
                    f"{split}: {manifest.rows} images in {len(manifest.shards)} shards, "
                    f"{len(manifest.skipped)} skipped"
                )
        elif args.command == "pretrain":
            _pretrain(args.config, args.overrides, floors=False, evaluate=not args.no_eval)
        elif args.command == "evaluate":
            print(_evaluate(args.checkpoint, args.floors, args.k, args.temperature))
        elif args.command == "tune":
            _tune(args)
        elif args.command == "demo":
            from pipeline.prepare import prepare

            prepare("fashion-mnist")
            _pretrain(args.config, args.overrides, floors=True, evaluate=True)
    except (ConfigError, SourceError, ShardError, SpaceError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
