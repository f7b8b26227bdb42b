"""Connecting to Ray: an existing cluster when one is given, else a local one sized for
small machines.

A Train worker that holds a whole CPU on a 2-core laptop leaves nothing for the Ray Data
stage, and the run stalls without an error. A local cluster therefore advertises more
logical CPUs than physical cores (at least 4) so that two training workers, the decode
tasks and Ray Data's coordinator can all be scheduled; the OS shares the real cores.
"""

from __future__ import annotations

import os
import signal
import time

import ray
import ray.data
from ray.data._internal.execution.execution_callback import ExecutionCallback

# How long Ray Data's scheduling loop rests between steps while an operator's finished
# output waits behind backpressure (see IdleWhileBackpressured).
BACKPRESSURE_REST_S = 0.05


def init_ray(num_cpus: int | None = None, object_store_gb: float = 2.0) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (set by ``ray job submit``), or start one.

    A SIGTERM handler the program installed (the CLI's, pipeline.cli.sigterm) stays: ray.init
    replaces it with one that kills a local cluster's processes at once and exits, so the
    driver's clean-up (``finally`` blocks that still talk to the cluster) could not run.
    """
    if ray.is_initialized():
        return
    on_sigterm = signal.getsignal(signal.SIGTERM)
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
    if callable(on_sigterm) and signal.getsignal(signal.SIGTERM) is not on_sigterm:
        signal.signal(signal.SIGTERM, on_sigterm)
    configure_data_context()


class IdleWhileBackpressured(ExecutionCallback):
    """Rests Ray Data's scheduling loop while it can only wait for its consumer.

    The loop blocks in ``ray.wait`` until a task has output. A long training stream soon
    runs ahead of training: its tasks hold finished batches that backpressure forbids the
    executor to take, so ``ray.wait`` returns at once, every step finds nothing to do,
    and the loop turns without pause. In a 100-epoch run's SplitCoordinator that took
    about 0.6 of a core of a 2-core machine, away from training. While an operator is in
    output backpressure its consumer has a full queue in front of it, so resting the loop
    ``BACKPRESSURE_REST_S`` per step costs no throughput.
    """

    def on_execution_step(self, executor: object) -> None:
        """Ray Data's per-step hook: sleep while an operator is in output backpressure."""
        # Ray Data's private state (pinned Ray version); absent, the loop just runs as before.
        topology = getattr(executor, "_topology", None) or {}
        if any(getattr(op, "_in_task_output_backpressure", False) for op in topology):
            time.sleep(BACKPRESSURE_REST_S)


def configure_data_context() -> None:
    """Quiet console (our progress lines replace Ray Data's per-operator bars), and a
    scheduling loop that rests while backpressure leaves it nothing to do."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    if IdleWhileBackpressured not in context.custom_execution_callback_classes:
        context.custom_execution_callback_classes.append(IdleWhileBackpressured)
