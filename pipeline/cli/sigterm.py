"""SIGTERM stops a command the way Ctrl-C does.

Schedulers (Slurm, Kubernetes, ``ray job stop``, systemd) ask a process to stop with SIGTERM
and kill it only after a grace period. While a command runs, :class:`SigtermAsInterrupt`
hands SIGTERM to whatever handles Ctrl-C at that moment: during ``TorchTrainer.fit()``
that is Ray Train's handler, which aborts the controller and its workers and then leaves
``fit`` with ``SystemExit``; during a sweep it is Ray Tune's, which saves the sweep for
``--resume``; elsewhere Python's, which raises ``KeyboardInterrupt``. Either way the
exception unwinds the driver's ``finally`` blocks (the run's ingest report is written),
and the command exits with :data:`TERMINATED_EXIT_CODE`.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

# 128 + SIGTERM: what a shell reports for a process that SIGTERM ended, and what schedulers
# expect of one that stopped because it was asked to (never 0: the work is not done).
TERMINATED_EXIT_CODE = 128 + signal.SIGTERM


class SigtermAsInterrupt:
    """Context manager: SIGTERM acts as Ctrl-C inside the block; ``received`` says whether
    one came. Outside the main thread (where signals cannot be handled) it does nothing."""

    def __init__(self) -> None:
        self.received = False
        self._installed = False
        self._previous: Callable[[int, FrameType | None], Any] | int | None = None

    def __enter__(self) -> SigtermAsInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._interrupt)
            self._installed = True
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._installed:
            # None: the previous handler was not installed from Python; the default stands in.
            previous = signal.SIG_DFL if self._previous is None else self._previous
            signal.signal(signal.SIGTERM, previous)
            self._installed = False

    def _interrupt(self, signum: int, frame: FrameType | None) -> None:
        """Do what SIGINT's handler of the moment does; an ignored or default SIGINT (a
        background job's) still raises ``KeyboardInterrupt``, so SIGTERM always stops."""
        self.received = True
        on_interrupt = signal.getsignal(signal.SIGINT)
        if not callable(on_interrupt):
            raise KeyboardInterrupt
        on_interrupt(signal.SIGINT, frame)
