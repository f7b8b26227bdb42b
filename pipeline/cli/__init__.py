"""Command line: ``python -m pipeline {prepare,pretrain,evaluate,embed,retrieval,preview,report,
tune,demo}`` (also ``ray-ssl``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEMO_CONFIG = CONFIGS / "fmnist_simclr_demo.yaml"

DESCRIPTION = """\
Self-supervised pretraining of image encoders on Ray.

Typical session:
  python -m pipeline prepare fashion-mnist            # IDX files -> Parquet shards (once)
  python -m pipeline pretrain --config configs/fmnist_simclr.yaml
  python -m pipeline evaluate --checkpoint runs/fmnist-simclr --protocol knn linear
  python -m pipeline retrieval --checkpoint runs/fmnist-simclr --out retrieval.png
  python -m pipeline report runs/fmnist-simclr runs/fmnist-byol --out runs/report
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
        help="convert an image source into Parquet shards (a Ray Data job)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Convert an image source into Parquet shards (columns id, image, label, source) plus a
manifest.json, as a Ray Data job: reading, decoding, checking and re-encoding run as
parallel tasks over the cluster's CPUs (RAY_ADDRESS, else a local cluster). JPEG/PNG bytes
are kept as they are; other formats and odd modes (CMYK, palette, 16-bit, ...) become 8-bit
PNG; unreadable, truncated and over-large images are skipped and listed with their reason
in the manifest's `skipped`. Progress is printed every few seconds with an ETA.

SOURCE is one of (folder:, parquet:, tar: and list: take a local path or an s3://, gs:// URI):
  fashion-mnist      Debian package dataset-fashion-mnist (IDX files); train + test splits
  mnist              MNIST IDX files under --root; train + test splits
  cifar10:DIR        CIFAR-10 python batches (data_batch_1..5, test_batch); train + test
  folder:DIR         an image folder or bucket prefix; first-level sub-folders are classes
                     (optional); id = path relative to DIR
  parquet:PATH       Parquet file(s) with an `image` column (binary, or a Hugging Face
                     {bytes, path} struct) and optional id, label; id = `id` or FILE/ROW
  tar:PATH           WebDataset tar shards (a .tar file or a folder/prefix of them): the
                     image is a sample's jpg/jpeg/png/webp/... member, the label its
                     cls/label/class member; id = TARNAME/KEY
  list:FILE          a CSV (with a header) or Parquet list of images: column uri or path
                     (relative to FILE's folder), optional label (ints, or names numbered
                     in sorted order) and id (default: the uri)

Ids and labels do not depend on the parallelism: the source is listed in sorted order and
cut into chunks of --rows-per-shard entries (one per tar file), chunk i -> part-0000i.parquet.
On a multi-node cluster, local paths (folder, parquet, tar, list and --out) must mean the same
on every node (a shared filesystem); bucket URIs work everywhere.

Cached and resumable: a split whose manifest exists is reused unless --overwrite. An
interrupted prepare, run again with the same arguments, keeps the shards it finished
(OUT/SPLIT/_prepare.json and _parts/ record them) and does only the rest; if the source or
--rows-per-shard changed meanwhile it refuses unless --overwrite, which starts again. The
manifest is written last, then the bookkeeping files are removed. --overwrite never deletes
a directory that holds files other than shards.

Examples:
  python -m pipeline prepare fashion-mnist
  python -m pipeline prepare folder:~/photos --out data/shards/photos --split train
  python -m pipeline prepare folder:s3://bucket/raw-images/ --out s3://bucket/shards/photos
  python -m pipeline prepare tar:s3://bucket/wds/ --out s3://bucket/shards/wds --tasks 32
  python -m pipeline prepare list:images.csv --split val
""",
    )
    prep.add_argument("source", help="what to convert (see above)")
    prep.add_argument(
        "--out",
        help="output directory or s3:// / gs:// prefix (default data/shards/NAME); each "
        "split goes to OUT/SPLIT",
    )
    prep.add_argument(
        "--root", type=Path, help="directory holding IDX files (fashion-mnist, mnist)"
    )
    prep.add_argument(
        "--split", default="train", help="split name for folder/parquet/tar/list sources"
    )
    prep.add_argument(
        "--rows-per-shard", type=int, default=4096, help="images per shard (default 4096)"
    )
    prep.add_argument(
        "--tasks",
        type=int,
        default=None,
        metavar="N",
        help="parallel Ray tasks (default: the cluster's CPUs)",
    )
    prep.add_argument(
        "--overwrite",
        action="store_true",
        help="rewrite existing shards, or restart an unfinished prepare from scratch",
    )

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
        help="judge a checkpoint: kNN, linear probe, few-label fine-tuning, transfer",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
The field's protocols on a checkpoint's frozen (or fine-tuned) backbone, each next to the
same architecture with random weights:
  knn       weighted kNN: the train split is the memory bank, the test split the queries;
            cosine similarity, votes weighted by exp(sim / T) (k=200, T=0.1 by default);
            also scores raw pixels
  linear    a linear classifier on the frozen features of the train split, scored on the
            test split (features standardised, SGD Nesterov 0.9, cosine, 100 epochs)
  finetune  backbone + new linear head trained end to end on class-balanced label subsets
            of the train split (1% and 10% by default, seeded by run.seed), crop + flip
The splits are the run's data.eval_train and data.eval_test; --train-data/--test-data
score another labelled dataset instead (transfer), decoded to the checkpoint's image size
and channels (prepare it first, e.g. `prepare mnist --root DIR`).
Results are merged into RUN_DIR/eval.json, which `report` compares across runs.

Examples:
  python -m pipeline evaluate --checkpoint runs/fmnist-simclr
  python -m pipeline evaluate --checkpoint runs/fmnist-simclr --protocol knn linear finetune
  python -m pipeline evaluate --checkpoint runs/fmnist-simclr --protocol linear \\
      --train-data data/shards/mnist/train --test-data data/shards/mnist/test
""",
    )
    ev.add_argument(
        "--checkpoint",
        type=str,
        required=True,
        help="a run directory (its latest checkpoint is used) or one checkpoint directory; "
        "a local path or an object-storage URI (s3://...)",
    )
    ev.add_argument(
        "--protocol",
        nargs="+",
        default=["knn"],
        choices=["knn", "linear", "finetune"],
        help="protocols to run (default: knn)",
    )
    ev.add_argument("--k", type=int, help="kNN neighbours (default: the run's eval.knn_k)")
    ev.add_argument(
        "--temperature", type=float, help="kNN vote temperature (default eval.knn_temperature)"
    )
    ev.add_argument(
        "--train-data", type=str, help="labelled shards to train/bank on (transfer; path or URI)"
    )
    ev.add_argument(
        "--test-data", type=str, help="labelled shards to score on (transfer; path or URI)"
    )
    ev.add_argument("--probe-epochs", type=int, default=100, help="linear probe epochs")
    ev.add_argument(
        "--fractions",
        nargs="+",
        type=float,
        default=[0.01, 0.1],
        help="label fractions for finetune (default: 0.01 0.1)",
    )
    ev.add_argument("--finetune-epochs", type=int, default=30, help="fine-tuning epochs")

    emb = commands.add_parser(
        "embed",
        help="write a checkpoint's embeddings of a shard directory as Parquet (Ray Data)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Batch inference with Ray Data: the shards are read and decoded by Ray Data tasks and embedded
by a pool of actors that each hold the frozen encoder (on a GPU each when the cluster has
them), so a million images use the cluster like training does. Writes Parquet shards with
id, embedding (L2-normalised backbone features) and label (-1 when unknown); undecodable
images are logged and counted, not written.

Examples:
  python -m pipeline embed --checkpoint runs/fmnist-simclr \\
      --data data/shards/fashion-mnist/test --out runs/fmnist-simclr/embeddings/test
""",
    )
    emb.add_argument(
        "--checkpoint", type=str, required=True, help="run or checkpoint directory (path or URI)"
    )
    emb.add_argument("--data", type=str, required=True, help="shard directory to embed (or URI)")
    emb.add_argument(
        "--out", type=str, required=True, help="output directory or URI (must be empty)"
    )
    emb.add_argument("--actors", type=int, default=1, help="encoder actors (default 1)")
    emb.add_argument("--batch-size", type=int, default=512, help="images per inference batch")
    emb.add_argument("--overwrite", action="store_true", help="replace Parquet files in --out")

    pics = commands.add_parser(
        "retrieval",
        help="PNG of test images and their nearest neighbours in feature space",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
The classic "what did it learn" picture: for the first --queries test images, their --k
nearest train images by cosine similarity of frozen features; green frames share the
query's label, red ones do not. --projector N also writes TensorBoard's embedding projector
(features, labels and image sprites of the first N test images) under RUN_DIR/tensorboard.

Examples:
  python -m pipeline retrieval --checkpoint runs/fmnist-simclr --out retrieval.png
  python -m pipeline retrieval --checkpoint runs/fmnist-simclr --out r.png --projector 1000
""",
    )
    pics.add_argument(
        "--checkpoint", type=str, required=True, help="run or checkpoint directory (path or URI)"
    )
    pics.add_argument("--out", type=Path, required=True, help="PNG to write")
    pics.add_argument("--queries", type=int, default=8, help="query images (rows)")
    pics.add_argument("--k", type=int, default=8, help="neighbours per query (columns)")
    pics.add_argument("--projector", type=int, default=0, metavar="N", help="projector sample")

    prev = commands.add_parser(
        "preview",
        help="PNG of training images and the random views the augment section draws",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
See what an augmentation setting does before training with it: one row per image of
data.train, the original and then --views random views drawn exactly as the data stage
draws them (same recipe, same code).

Examples:
  python -m pipeline preview --config configs/fmnist_simclr.yaml --out preview.png
  python -m pipeline preview --set augment.strength=1.0 --set augment.crop_scale_min=0.08 \\
      --out strong.png
""",
    )
    _add_config_args(prev, CONFIGS / "fmnist_simclr.yaml")
    prev.add_argument("--out", type=Path, required=True, help="PNG to write")
    prev.add_argument("--images", type=int, default=8, help="images (rows)")
    prev.add_argument("--views", type=int, default=6, help="views per image (columns)")
    prev.add_argument("--seed", type=int, default=0, help="seed of the drawn views")

    rep = commands.add_parser(
        "report",
        help="compare runs by every protocol: Markdown table + PNG bar chart",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Reads RUN_DIR/eval.json of each run (written by `evaluate` and at the end of `pretrain`)
and writes OUT/report.md (one row per run, one column per protocol, best in bold) and
OUT/report.png (top-1 by protocol, one bar per run).

Examples:
  python -m pipeline report runs/fmnist-simclr runs/fmnist-byol --out runs/report
""",
    )
    rep.add_argument("runs", nargs="+", type=str, help="run directories (paths or URIs)")
    rep.add_argument("--out", type=str, default="runs/report", help="output directory or URI")

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


def _resolve_checkpoint(path: str) -> str:
    """A checkpoint directory or file as given, else the run directory's latest checkpoint
    (local paths and object-storage URIs alike)."""
    from pipeline.data import locations
    from pipeline.train.checkpoint import CHECKPOINT_FILE, latest_checkpoint

    path = locations.absolute(path)
    if locations.is_file(locations.join(path, CHECKPOINT_FILE)) or locations.is_file(path):
        return path
    return latest_checkpoint(path)


def _save_results(checkpoint: str, context, results: dict, run: str | None = None) -> None:
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


def _evaluate(checkpoint: str, floors: bool, save: bool, run: str | None = None) -> str:
    """The kNN table that ends ``pretrain`` and ``demo``; with ``save``, also recorded in the
    run's eval.json (the checkpoint's parent, or ``run``)."""
    from pipeline.eval.evaluate import evaluate_checkpoint, load_eval_context
    from pipeline.eval.protocols import knn_results

    checkpoint = _resolve_checkpoint(checkpoint)
    with load_eval_context(checkpoint) as context:
        report = evaluate_checkpoint(context, floors=floors)
        accounts = "\n".join(context.accounts.values())
        if save:
            _save_results(checkpoint, context, knn_results(report), run)
    return f"checkpoint: {checkpoint}\n{accounts}\n{report.table()}"


def _evaluate_protocols(args: argparse.Namespace) -> str:
    from pipeline.data import locations
    from pipeline.eval.evaluate import load_eval_context
    from pipeline.eval.protocols import (
        ProtocolSettings,
        label_subsets,
        results_table,
        run_protocols,
    )

    if (args.train_data is None) != (args.test_data is None):
        raise ValueError("transfer needs both --train-data and --test-data (one dataset's splits)")
    checkpoint = _resolve_checkpoint(args.checkpoint)
    settings = ProtocolSettings(
        k=args.k,
        temperature=args.temperature,
        probe_epochs=args.probe_epochs,
        fractions=tuple(args.fractions),
        finetune_epochs=args.finetune_epochs,
    )
    # prepare writes a dataset's splits to DATASET/<split>, so the parent names the dataset.
    suffix = (
        f"@{locations.name(locations.parent(locations.absolute(args.test_data)))}"
        if args.test_data
        else ""
    )
    with load_eval_context(checkpoint, args.train_data, args.test_data) as context:
        results = run_protocols(context, args.protocol, settings, suffix)
        _save_results(checkpoint, context, results)
        if "finetune" in args.protocol:  # the label subsets, by image id, for reproduction
            subsets = label_subsets(context, settings.fractions)
            locations.write_text(
                locations.join(locations.parent(checkpoint), f"finetune_subsets{suffix}.json"),
                json.dumps(subsets) + "\n",
            )
        accounts = "\n".join(context.accounts.values())
        test_name = context.test_name
    return (
        f"checkpoint: {checkpoint}\ntest split: {test_name}\n{accounts}\n{results_table(results)}"
    )


def _embed(args: argparse.Namespace) -> str:
    from pipeline.cluster import init_ray
    from pipeline.eval.embed import export_embeddings

    init_ray()
    checkpoint = _resolve_checkpoint(args.checkpoint)
    summary = export_embeddings(
        checkpoint,
        args.data,
        args.out,
        batch_size=args.batch_size,
        actors=args.actors,
        overwrite=args.overwrite,
    )
    rejected = "".join(f"\n  rejected {id_}: {reason}" for id_, reason in summary.rejects[:10])
    return (
        f"{args.out}: {summary.rows_written} embeddings of dimension {summary.dim} "
        f"({summary.rows_read} rows read, {summary.rejected} rejected){rejected}"
    )


def _retrieval(args: argparse.Namespace) -> str:
    """Only the shown images are decoded here: the queries (and the projector's sample)
    from the head of the test split, the neighbours fetched by id after a streamed kNN
    search of the train split's features."""
    import numpy as np
    import torch

    from pipeline.data import locations
    from pipeline.data.image_features import extract_features
    from pipeline.data.ingest import read_decoded
    from pipeline.eval.evaluate import BANK_CHUNK, images_by_id, load_eval_context
    from pipeline.eval.pictures import add_projector, retrieval_grid
    from ssl_models.knn import RunningTopK

    checkpoint = _resolve_checkpoint(args.checkpoint)
    with load_eval_context(checkpoint) as context:
        mean, std = context.mean_std
        sample = read_decoded(context.test_dir, context.spec, max(args.queries, args.projector))
        test = extract_features(context.method.features, sample.pixels, mean, std)
        bank = context.features("trained", "train")
        top = RunningTopK(test[: args.queries], args.k)
        offset = 0
        for features, _ in bank.batches(BANK_CHUNK):
            top.update(features, torch.arange(offset, offset + len(features)))
            offset += len(features)
        if top.seen < args.k:
            raise ValueError(f"--k {args.k} is more than the {top.seen} train images")
        ids_of = bank.ids_at(top.values.flatten().tolist())
        neighbour_ids = [[ids_of[p] for p in row] for row in top.values.tolist()]
        images = images_by_id(
            context.train_dir, sorted({i for row in neighbour_ids for i in row}), context.spec
        )
        queries = slice(0, args.queries)
        path = retrieval_grid(
            sample.pixels[queries],
            np.stack([np.stack([images[i][0] for i in row]) for row in neighbour_ids]),
            args.out,
            query_labels=sample.labels[queries],
            neighbour_labels=np.array([[images[i][1] for i in row] for row in neighbour_ids]),
        )
        if args.projector:
            from tensorboardX import SummaryWriter

            projected = slice(0, args.projector)
            logdir = locations.join(locations.parent(checkpoint), "tensorboard")
            with SummaryWriter(logdir) as writer:
                add_projector(
                    writer,
                    test[projected],
                    sample.labels[projected].tolist(),
                    sample.pixels[projected],
                    tag="test",
                    step=int(context.state.epoch),
                )
    return f"wrote {path}"


def _preview(args: argparse.Namespace) -> str:
    from pipeline.config import load_config
    from pipeline.data.ingest import ImageSpec, read_decoded
    from pipeline.data.shards import load_manifest
    from pipeline.eval.pictures import augmentation_preview
    from pipeline.train.views import view_recipe

    config = load_config(args.config, args.overrides)
    spec = ImageSpec.from_manifest(load_manifest(config.data.train), config.data.image_size)
    images = read_decoded(config.data.train, spec, args.images)
    recipe = view_recipe(config, spec.size)
    path = augmentation_preview(images.pixels, recipe, args.views, args.out, seed=args.seed)
    return f"wrote {path}"


def _report(args: argparse.Namespace) -> str:
    from pipeline.data import locations
    from pipeline.eval.report import build_report

    table, chart = build_report(args.runs, args.out)
    return f"{table}\n\nwrote {locations.join(args.out, 'report.md')} and {chart}"


def _pretrain(config_path: Path | None, overrides: list[str], floors: bool, evaluate: bool) -> None:
    from pipeline.config import load_config
    from pipeline.data import locations
    from pipeline.train.driver import pretrain, run_dir

    config = load_config(config_path, overrides)
    result = pretrain(config)
    run = run_dir(config)
    print(f"run directory: {run}")
    if evaluate and result.checkpoint is not None:
        # The run may live in object storage: the checkpoint is read from there, and
        # eval.json and knn.txt are written there too.
        try:
            checkpoint = _resolve_checkpoint(run)
        except FileNotFoundError:
            checkpoint = result.checkpoint.path
        table = _evaluate(checkpoint, floors, save=True, run=run)
        print(table)
        locations.write_text(locations.join(run, "knn.txt"), table + "\n")


def _tune(args: argparse.Namespace) -> int:
    """Run the sweep; exit status 1 when every trial errored (nothing was learned)."""
    from pipeline.config import load_config
    from pipeline.data import locations
    from pipeline.tune.sweep import SweepSettings, sweep, sweep_dir
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
    rows = sweep(config, space, settings, resume=args.resume)
    if rows and all(row["status"].startswith("ERROR") for row in rows):
        results = locations.join(sweep_dir(config, settings), "results.csv")
        print(
            f"error: all {len(rows)} trials failed; their tracebacks are above, "
            f"their parameters in {results}",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "prepare":
            from pipeline.data.prepare import prepare

            for split, manifest in prepare(
                args.source,
                args.out,
                root=args.root,
                split=args.split,
                rows_per_shard=args.rows_per_shard,
                overwrite=args.overwrite,
                tasks=args.tasks,
            ).items():
                print(
                    f"{split}: {manifest.rows} images in {len(manifest.shards)} shards, "
                    f"{len(manifest.skipped)} skipped"
                )
        elif args.command == "pretrain":
            _pretrain(args.config, args.overrides, floors=False, evaluate=not args.no_eval)
        elif args.command == "evaluate":
            print(_evaluate_protocols(args))
        elif args.command in ("embed", "retrieval", "preview", "report"):
            print(
                {"embed": _embed, "retrieval": _retrieval, "preview": _preview, "report": _report}[
                    args.command
                ](args)
            )
        elif args.command == "tune":
            return _tune(args)
        elif args.command == "demo":
            from pipeline.data.prepare import prepare

            prepare("fashion-mnist")
            _pretrain(args.config, args.overrides, floors=True, evaluate=True)
    # Bad input (ConfigError, ShardError, SourceError, SpaceError, ... are ValueErrors) gets
    # one clear line, not a traceback.
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
