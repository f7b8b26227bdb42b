"""``prepare``: turn an image source into Parquet shards, once, as a Ray Data job.

Sources are named like ``fashion-mnist``, ``mnist``, ``cifar10:DIR``, ``folder:DIR``,
``parquet:PATH``, ``tar:PATH`` or ``list:FILE``; DIR/PATH/FILE of the last four may be a
bucket prefix (``s3://...``, ``gs://...``), and so may the output. Known datasets with a
train/test split produce ``OUT/train`` and ``OUT/test``; the other sources produce one split,
``OUT/<split>``.

How one split is made:

1. On the driver, the source is listed into a sorted plan of chunks (``pipeline.data.sources``):
   ``rows_per_shard`` consecutive entries per chunk (one tar file per chunk for ``tar:``).
   Chunk ``i`` becomes shard ``part-{i:05d}.parquet``, so ids, labels and shard contents
   are the same whatever the parallelism.
2. ``OUT/<split>/_prepare.json`` records the plan's fingerprint (source, rows per shard and
   a hash of every entry).
3. A Ray Data job (``from_items`` of the chunks, ``map_batches`` one chunk per task over a
   task pool of ``tasks``) reads, decodes, checks and re-encodes each chunk's images,
   writes its shard and then a small record of what it wrote
   (``OUT/<split>/_parts/part-{i:05d}.json``). The driver prints progress with an ETA.
4. The driver merges the records in chunk order into ``manifest.json``, written last and
   atomically, then removes ``_prepare.json`` and ``_parts/``: a finished split holds only
   shards and the manifest.

Idempotent and resumable: a split whose manifest exists is reused unless ``overwrite``; an
unfinished split with the same plan resumes, skipping chunks whose record exists; an
unfinished split of a different plan is refused unless ``overwrite``, which deletes it (a
directory holding files that are not shards is never deleted).
"""

from __future__ import annotations

import contextlib
import json
import os
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.data import locations
from pipeline.data.shards import (
    MANIFEST_NAME,
    PARTS_DIR,
    PLAN_NAME,
    PartStats,
    ShardError,
    ShardManifest,
    load_manifest,
    manifest_from_parts,
    part_name,
    remove_shards,
    write_part,
)
from pipeline.data.sources import (
    Chunk,
    SkipCounter,
    SourceError,
    SourcePlan,
    builtin_idx_files,
    chunk_records,
    plan_cifar10,
    plan_folder,
    plan_idx,
    plan_list,
    plan_parquet,
    plan_tar,
)

BUILTIN = ("fashion-mnist", "mnist")
SOURCE_KINDS = ("cifar10", "folder", "parquet", "tar", "list")
PROGRESS_EVERY_S = 5.0


def _split_planners(
    source: str, root: Path | None, split: str, rows_per_shard: int
) -> dict[str, Callable[[], SourcePlan]]:
    """Map each split the source has to a function making its plan (checks the name now)."""
    if rows_per_shard < 1:
        raise SourceError(f"rows_per_shard must be at least 1, got {rows_per_shard}")
    if source in BUILTIN:

        def idx(name: str) -> Callable[[], SourcePlan]:
            return lambda: plan_idx(
                *builtin_idx_files(source, name, root), source, name, rows_per_shard
            )

        return {"train": idx("train"), "test": idx("test")}
    kind, sep, location = source.partition(":")
    if not sep or kind not in SOURCE_KINDS or not location:
        raise SourceError(
            f"unknown source {source!r}: use one of {', '.join(BUILTIN)}, "
            + ", ".join(f"{k}:PATH" for k in SOURCE_KINDS)
        )
    if kind == "cifar10":
        path = Path(location).expanduser()
        if not path.exists():
            raise SourceError(f"source path {path} does not exist")
        return {n: partial(plan_cifar10, path, n, rows_per_shard) for n in ("train", "test")}
    planner = {"folder": plan_folder, "parquet": plan_parquet, "list": plan_list}.get(kind)
    if planner is None:
        return {split: lambda: plan_tar(location)}
    return {split: lambda: planner(location, rows_per_shard)}


def default_out(source: str) -> Path:
    """``data/shards/<name>`` for a source, e.g. data/shards/fashion-mnist; the name of a
    ``list:`` or ``tar:`` file drops its extension."""
    if source in BUILTIN:
        return Path("data") / "shards" / source
    kind, _, location = source.partition(":")
    name = locations.name(location.rstrip("/")) if location.strip("/") else ""
    if kind in ("list", "tar"):
        for suffix in (".csv", ".parquet", ".tar"):
            name = name.removesuffix(suffix)
    return Path("data") / "shards" / (name or "dataset")


@dataclass(frozen=True)
class Progress:
    """Where one split's job stands, after each finished chunk."""

    split: str
    chunks_done: int
    chunks_total: int
    chunks_resumed: int  # done by an earlier, interrupted run
    images: int  # rows written so far, resumed chunks included
    images_per_s: float  # this run's rate
    eta_s: float | None

    def line(self) -> str:
        """The progress line printed for the split."""
        eta = "?" if self.eta_s is None else f"{int(self.eta_s // 60)}m{int(self.eta_s % 60):02d}s"
        resumed = f" ({self.chunks_resumed} resumed)" if self.chunks_resumed else ""
        return (
            f"{self.split}: {self.chunks_done}/{self.chunks_total} shards{resumed}, "
            f"{self.images:,} images, {self.images_per_s:,.0f} img/s, ETA {eta}"
        )


class _Printer:
    """The default progress consumer: one line every few seconds, and the last one."""

    def __init__(self, every_s: float = PROGRESS_EVERY_S) -> None:
        self.every_s, self.last = every_s, 0.0

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        if progress.chunks_done == progress.chunks_total or now - self.last >= self.every_s:
            self.last = now
            print(progress.line(), flush=True)


def _record_location(split_dir: str, index: int) -> str:
    return locations.join(split_dir, PARTS_DIR, f"part-{index:05d}.json")


def run_chunk(spec: dict[str, Any], payload: bytes, split_dir: str) -> dict[str, Any]:
    """One task's work: read, check and re-encode a chunk's images, write its shard, then its
    record (``_parts/part-i.json``). Returns the record, or ``{"index", "error"}`` when the
    chunk's input cannot be read as a whole (a corrupt tar or Parquet file, ...)."""
    index = spec["index"]
    chunk = Chunk(index, spec["chunk"], payload)
    skipped = SkipCounter()
    started = time.monotonic()
    try:
        stats = write_part(
            chunk_records(chunk, skipped),
            locations.join(split_dir, part_name(index)),
            skipped=skipped,
        )
    except (ValueError, OSError, pa.ArrowException, EOFError, tarfile.TarError) as exc:
        # SourceError, ShardError, LocationError, a corrupt tar or Parquet file, ...
        message = (str(exc).strip().splitlines() or [""])[0]  # Ray's retry notes follow
        return {"index": index, "error": f"{chunk.describe()}: {type(exc).__name__}: {message}"}
    record = {
        "index": index,
        **stats.to_dict(),
        "skipped": skipped.reasons,
        "seconds": round(time.monotonic() - started, 3),
    }
    locations.write_text(_record_location(split_dir, index), json.dumps(record) + "\n")
    return record


def _run_chunks(batch: dict[str, np.ndarray], split_dir: str) -> dict[str, np.ndarray]:
    records = [
        json.dumps(run_chunk(json.loads(spec), bytes(payload), split_dir))
        for spec, payload in zip(batch["spec"], batch["payload"], strict=True)
    ]
    return {"record": np.asarray(records, dtype=object)}


def _plan_state(source: str, plan: SourcePlan, rows_per_shard: int) -> dict[str, Any]:
    return {
        "fingerprint": plan.fingerprint,
        "source": source,
        "rows_per_shard": rows_per_shard,
        "chunks": len(plan.chunks),
    }


def _start_or_resume(
    split_dir: str, state: dict[str, Any], overwrite: bool
) -> dict[int, dict[str, Any]]:
    """Make ``split_dir`` ready for ``state``'s plan; return the records of chunks an earlier
    run of the same plan finished (their shards present)."""
    plan_file = locations.join(split_dir, PLAN_NAME)
    if overwrite:
        remove_shards(split_dir)
    elif locations.exists(split_dir):
        entries = locations.list_files(split_dir)
        if entries and not any(e.relative == PLAN_NAME for e in entries):
            raise ShardError(
                f"{split_dir} exists but is not a complete shard directory and holds no "
                f"unfinished prepare; pass --overwrite to replace it"
            )
        if entries:
            try:
                before = json.loads(locations.read_text(plan_file))
            except (OSError, ValueError) as exc:
                raise ShardError(f"{plan_file}: unreadable ({exc}); pass --overwrite") from exc
            if before.get("fingerprint") != state["fingerprint"]:
                changed = [k for k in ("source", "rows_per_shard") if before.get(k) != state[k]]
                what = ", ".join(f"{k} {before.get(k)!r} -> {state[k]!r}" for k in changed)
                raise ShardError(
                    f"{split_dir} holds an unfinished prepare of a different plan "
                    f"({what or 'the source files changed'}); pass --overwrite to discard "
                    "it and start again"
                )
            present = {e.relative for e in entries}
            done = {}
            for entry in entries:
                if not entry.relative.startswith(f"{PARTS_DIR}/") or ".tmp-" in entry.relative:
                    continue
                try:
                    record = json.loads(locations.read_text(entry.location))
                except (OSError, ValueError):
                    continue  # redone
                if record.get("shard") is None or record["shard"] in present:
                    done[int(record["index"])] = record
            return done
    locations.write_text(plan_file, json.dumps(state, indent=2) + "\n")
    return {}


def _default_tasks() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _chunk_job(pending: list[Chunk], split_dir: str, tasks: int | None) -> Iterator[dict[str, Any]]:
    """Run the ``pending`` chunks as a Ray Data job in up to ``tasks`` parallel tasks (None:
    one per cluster CPU); yield each chunk's record as it finishes."""
    import ray.data

    from pipeline.cluster import init_ray

    init_ray()
    tasks = max(1, min(tasks or _default_tasks(), len(pending)))
    items = [
        {
            "spec": json.dumps({"index": chunk.index, "chunk": chunk.spec}),
            "payload": chunk.payload,
        }
        for chunk in pending
    ]
    # Ray types map_batches' fn as taking the batch alone; fn_kwargs supplies the rest.
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _run_chunks,  # type: ignore[arg-type]
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=tasks),
        fn_kwargs={"split_dir": split_dir},
        num_cpus=1,
    )
    for row in dataset.iter_rows():
        yield json.loads(row["record"])


def _run_job(
    split: str,
    split_dir: str,
    plan: SourcePlan,
    done: dict[int, dict[str, Any]],
    tasks: int | None,
    progress: Callable[[Progress], None],
) -> dict[int, dict[str, Any]]:
    """Run the plan's unfinished chunks as a Ray Data job; return every chunk's record."""
    records = dict(done)
    pending = [chunk for chunk in plan.chunks if chunk.index not in done]
    total_work = sum(chunk.work for chunk in pending) or 1
    work = {chunk.index: chunk.work for chunk in plan.chunks}
    images = sum(r.get("rows", 0) for r in done.values())
    started, new_images, done_work = time.monotonic(), 0, 0

    def report() -> None:
        elapsed = max(time.monotonic() - started, 1e-6)
        eta = elapsed * (total_work - done_work) / done_work if done_work else None
        progress(
            Progress(
                split,
                len(records),
                len(plan.chunks),
                len(done),
                images,
                new_images / elapsed,
                eta if pending else 0.0,
            )
        )

    if not pending:
        report()
        return records
    for record in _chunk_job(pending, split_dir, tasks):
        records[record["index"]] = record
        if "error" not in record:
            images += record["rows"]
            new_images += record["rows"]
        done_work += work[record["index"]]
        report()
    return records


def _prepare_split(
    source: str,
    split: str,
    split_dir: str,
    plan: SourcePlan,
    rows_per_shard: int,
    overwrite: bool,
    tasks: int | None,
    progress: Callable[[Progress], None],
) -> ShardManifest:
    done = _start_or_resume(split_dir, _plan_state(source, plan, rows_per_shard), overwrite)
    records = _run_job(split, split_dir, plan, done, tasks, progress)
    errors = [records[i]["error"] for i in sorted(records) if "error" in records[i]]
    if errors:
        more = f" (and {len(errors) - 1} more chunks)" if len(errors) > 1 else ""
        raise SourceError(
            f"{split}: {errors[0]}{more}; the other chunks are kept, run prepare again to "
            "resume once the input is fixed (or pass --overwrite)"
        )
    ordered = [records[chunk.index] for chunk in plan.chunks]
    skipped = dict(plan.skipped)
    for record in ordered:
        skipped.update(record["skipped"])
    skipped = dict(sorted(skipped.items()))
    parts = [PartStats.from_dict(record) for record in ordered]
    manifest = manifest_from_parts(parts, f"{source}:{split}", skipped)
    if manifest.rows == 0:
        raise ShardError(f"{split_dir}: no images to write ({len(skipped)} skipped)")
    # The manifest goes in last, so a directory with one always has every shard.
    locations.write_text(locations.join(split_dir, MANIFEST_NAME), manifest.to_json())
    for chunk in plan.chunks:
        locations.delete_file(_record_location(split_dir, chunk.index))
    filesystem, parts_path = locations.resolve(locations.join(split_dir, PARTS_DIR))
    with contextlib.suppress(OSError):  # the empty local folder; nothing in object storage
        filesystem.delete_dir(parts_path)
    locations.delete_file(locations.join(split_dir, PLAN_NAME))
    return manifest


def prepare(
    source: str,
    out: str | os.PathLike[str] | None = None,
    *,
    root: Path | None = None,
    split: str = "train",
    rows_per_shard: int = 4096,
    overwrite: bool = False,
    tasks: int | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> dict[str, ShardManifest]:
    """Write (or reuse, or finish) the shards of every split of ``source`` under ``out``
    (a local directory or a bucket prefix); returns their manifests.

    Runs on the Ray cluster named by ``RAY_ADDRESS`` (else a local one) with ``tasks``
    parallel tasks (default: the cluster's CPUs); Ray is started only when there is work.
    ``progress`` gets a :class:`Progress` after every chunk (default: a line on stdout every
    few seconds). Output on local disk must be reachable from every node of the cluster.
    """
    out_location = locations.absolute(out if out is not None else default_out(source))
    planners = _split_planners(source, root, split, rows_per_shard)
    progress = progress or _Printer()
    manifests = {}
    for name, planner in planners.items():
        split_dir = locations.join(out_location, name)
        if not overwrite and locations.is_file(locations.join(split_dir, MANIFEST_NAME)):
            manifests[name] = load_manifest(split_dir)
            continue
        plan = planner()
        manifests[name] = _prepare_split(
            source, name, split_dir, plan, rows_per_shard, overwrite, tasks, progress
        )
    return manifests
