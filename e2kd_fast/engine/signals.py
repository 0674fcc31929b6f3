"""SIGTERM and SIGINT as requests to stop after the current training step.

A cluster preempts a job with SIGTERM (and kills it a grace period later); Ctrl-C sends SIGINT. While
`StopSignals` is active, either one only records the request: the trainer finishes the step it is in,
writes ``last.pt`` and stops with `TrainingInterrupted`. A second SIGINT stops at once
(``KeyboardInterrupt``, no checkpoint), for when the step itself hangs. The handlers are installed in
the main thread only (Python delivers signals there) and the previous ones are restored on exit.

DataLoader workers forked while the handlers are installed inherit them, so a SIGINT sent to the
whole process group (Ctrl-C in a terminal) no longer kills the workers under the step being finished.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Context manager: while active, SIGTERM / SIGINT set `requested` instead of ending the process."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        """``"SIGTERM"`` or ``"SIGINT"`` (empty while none arrived)."""
        return "" if self.signum is None else signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """What a shell reports for a process ended by the signal: 128 + its number (143, 130)."""
        return 128 + int(self.signum or 0)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without the checkpoint
        if self.signum is None:
            self.signum = signum


__all__ = ["STOP_SIGNALS", "StopSignals"]
