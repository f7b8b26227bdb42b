"""Connecting to Ray: an existing cluster when one is given, else a local one sized for
small machines.

A Train worker that holds a whole CPU on a 2-core laptop leaves nothing for the Ray Data
stage, and the run stalls without an error. A local cluster therefore advertises more
logical CPUs than physical cores (at least 4) so that two training workers, the decode
tasks and Ray Data's coordinator can all be scheduled; the OS shares the real cores.
"""

from __future__ import annotations

import os

import ray
import ray.data


def init_ray(num_cpus: int | None = None, object_store_gb: float = 2.0) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (set by ``ray job submit``), or start one."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        # A laptop cluster is never preempted; skipping Train's watcher saves a process
        # start (about 1 s of the time to the first step on 2 cores).
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        cores = os.cpu_count() or 1
        ray.init(
            num_cpus=num_cpus or max(4, 2 * cores),
            # Ray Train's controller uses the dashboard's State API; loopback only.
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            object_store_memory=int(object_store_gb * 2**30),
        )
    configure_data_context()


def configure_data_context() -> None:
    """Quiet console: our progress lines replace Ray Data's per-operator bars."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
