"""Accounting for every training row: each epoch's rows are delivered or rejected, by id.

The Ray Data stage records, per epoch (one pass over the shards), how many rows it decoded
and which it rejected and why; rank 0 reports the tally after each epoch and writes it to
``ingest_report.json`` in the run directory. The ledger also tells the stage where training
stands: when Ray Train restarts failed workers from a checkpoint, the stream starts over,
and the passes already trained are skipped without being decoded. A pass is accounted for when
delivered + rejected == rows; rows not yet decoded (the stream runs ahead of training and
stops with it) are reported as such, never silently lost.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import pyarrow.fs
import ray
from ray.actor import ActorHandle

REPORT_FILE = "ingest_report.json"


@ray.remote(num_cpus=0)
class IngestLedger:
    """Collects the data stage's per-epoch counts; one per pretraining run."""

    def __init__(self, rows_per_epoch: int) -> None:
        self.rows_per_epoch = rows_per_epoch
        self.delivered: dict[int, int] = defaultdict(int)
        self.rejected: dict[int, list[tuple[str, str]]] = defaultdict(list)
        self.epochs_done = 0

    def resume_from(self, epochs_done: int) -> None:
        """Training (re)starts after ``epochs_done`` epochs: passes up to there are skipped
        unread, and counts of later passes, cut short by a failure, start over."""
        self.epochs_done = epochs_done
        for counts in (self.delivered, self.rejected):
            for epoch in [e for e in counts if e > epochs_done]:
                del counts[epoch]

    def completed(self) -> int:
        """How many epochs training has completed (the passes the stream skips unread)."""
        return self.epochs_done

    def record(self, epoch: int, delivered: int, rejected: list[tuple[str, str]]) -> None:
        """Count one batch of ``epoch``: rows delivered and (id, reason) of those rejected."""
        self.delivered[epoch] += delivered
        self.rejected[epoch].extend(rejected)

    def report(self) -> dict[int, dict[str, Any]]:
        """Per epoch (1-based): rows, delivered, rejected, not yet decoded, and the rejects."""
        report = {}
        for epoch in sorted(set(self.delivered) | set(self.rejected)):
            delivered, rejected = self.delivered[epoch], self.rejected[epoch]
            report[epoch] = {
                "rows": self.rows_per_epoch,
                "delivered": delivered,
                "rejected": len(rejected),
                "not_decoded": self.rows_per_epoch - delivered - len(rejected),
                "rejects": [{"id": image_id, "reason": reason} for image_id, reason in rejected],
            }
        return report


def start_ledger(rows_per_epoch: int, **actor_options: Any) -> ActorHandle:
    """Start an ``IngestLedger`` actor for passes of ``rows_per_epoch`` rows;
    ``actor_options`` are Ray's (e.g. a scheduling strategy)."""
    # mypy does not apply class decorators, so it misses the actor class @ray.remote made.
    actor_class = IngestLedger.options(**actor_options)  # type: ignore[attr-defined]
    return actor_class.remote(rows_per_epoch)


def fetch_report(ledger: ActorHandle) -> dict[int, dict[str, Any]]:
    """The ledger actor's ``IngestLedger.report``, so far (blocks until it answers)."""
    # An ActorHandle's methods are untyped (Never): the reply's type is IngestLedger.report's.
    reply: ray.ObjectRef[dict[int, dict[str, Any]]] = ledger.report.remote()
    return ray.get(reply)


def summary_line(epoch: int, counts: dict[str, Any]) -> str:
    """One epoch's tally as a progress line, naming the first few rejected ids."""
    line = (
        f"data, epoch {epoch}: {counts['rows']} rows = {counts['delivered']} delivered + "
        f"{counts['rejected']} rejected"
    )
    if counts["not_decoded"]:
        line += f" + {counts['not_decoded']} not decoded yet"
    if counts["rejects"]:
        shown = ", ".join(f"{r['id']} ({r['reason']})" for r in counts["rejects"][:3])
        line += f"; rejected: {shown}" + (", ..." if counts["rejected"] > 3 else "")
    return line


def write_report(run_dir: str, report: dict[int, dict[str, Any]]) -> None:
    """Write the report as JSON into the run directory (a local path or a storage URI)."""
    filesystem, path = pyarrow.fs.FileSystem.from_uri(run_dir)
    filesystem.create_dir(path, recursive=True)
    with filesystem.open_output_stream(f"{path}/{REPORT_FILE}") as out:
        out.write(json.dumps({str(k): v for k, v in report.items()}, indent=1).encode())
