"""Run logging: ``metrics.jsonl`` in the run folder (one JSON object per line) and TensorBoard, and the
run's readable log: the package logger ``e2kd_fast`` to ``<run>/train.log`` and the console (`run_log`)."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# The package's logger; the trainer logs to its child "e2kd_fast.train".
LOGGER_NAME = "e2kd_fast"
_FILE_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
_CONSOLE_FORMAT = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%H:%M:%S")


class ProgressBarHandler(logging.Handler):
    """Writes each record to stderr through ``tqdm.write``, which clears an open progress bar and draws it
    again below the line (and writes plainly when no bar is open)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never stop a run: report it the way logging does
            self.handleError(record)


@contextmanager
def run_log(run_dir: str | Path, *, enabled: bool = True, console: bool | None = None) -> Iterator[logging.Logger]:
    """While the block runs, the ``e2kd_fast`` logger's records go to ``<run>/train.log`` and the console.

    ``train.log`` is appended to, so a resumed run continues it. The console handler writes through
    tqdm (`ProgressBarHandler`), so lines and the progress bar do not break each other, with or
    without a bar. The logger's level is INFO for the block unless the application set one.

    Args:
        run_dir: the run folder.
        enabled: False (ranks other than 0): nothing is attached.
        console: write to the console too; None: only when the application has configured no logging
            of its own (no handler on the root or package logger; e.g. ``logging.basicConfig`` or
            pytest's capture make the records go there instead, once).

    Raises:
        OSError: ``train.log`` cannot be opened (``filename`` is set).
    """
    logger = logging.getLogger(LOGGER_NAME)
    if not enabled:
        yield logger
        return
    if console is None:
        console = not logging.getLogger().handlers and not logger.handlers
    path = Path(run_dir) / "train.log"
    try:
        file_handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    except OSError as err:
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err
    file_handler.setFormatter(_FILE_FORMAT)
    handlers: list[logging.Handler] = [file_handler]
    if console:
        console_handler = ProgressBarHandler()
        console_handler.setFormatter(_CONSOLE_FORMAT)
        handlers.append(console_handler)
    level = logger.level
    if level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield logger
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(level)


class MetricsLogger:
    """Appends records to ``<run>/metrics.jsonl`` and mirrors scalars to TensorBoard (``<run>/tb``).

    Each record has ``kind`` (``"train"``, ``"eval"``, ...), ``step``, ``time`` and its values. The
    JSONL file is appended to and flushed per record, so a resumed run continues the same file (after
    `keep_only` has dropped what the resume will write again). ``purge_step``: TensorBoard discards
    the run's earlier events from this step on (a resumed run passes the step after its checkpoint's).
    A failed write raises ``OSError`` with ``filename`` set to the file.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, purge_step: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional at runtime; metrics.jsonl always works
                SummaryWriter = None
            if SummaryWriter is not None:
                self._writer = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=purge_step)

    def log(self, kind: str, step: int, **values: Any) -> dict[str, Any]:
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **_plain(values)}
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:  # a write error carries no file name of its own: name the file
            raise OSError(err.errno, err.strerror or str(err), str(self.path)) from err
        if self._writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and not isinstance(value, bool) and key not in ("step", "time"):
                    self._writer.add_scalar(f"{kind}/{key}", value, step)
            self._writer.flush()
        return record

    def keep_only(self, keep: Callable[[dict[str, Any]], bool]) -> int:
        """Rewrites ``metrics.jsonl`` (atomically) with the records ``keep`` accepts; returns how many went.

        A line that is not JSON (the tail of a process killed while writing it) goes too.
        """
        if not self.path.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped += bool(line.strip())
                continue
            if keep(record):
                kept.append(line + "\n")
            else:
                dropped += 1
        if dropped:
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            try:
                tmp.write_text("".join(kept))
                os.replace(tmp, self.path)
            except OSError as err:
                tmp.unlink(missing_ok=True)
                raise OSError(err.errno, err.strerror or str(err), str(self.path)) from err
        return dropped

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of ``<run>/metrics.jsonl`` (optionally of one kind)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r["kind"] == kind]


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)  # JSON has no NaN/inf
        out[key] = value
    return out


class NullMetricsLogger:
    """What ranks other than 0 log to: nothing (rank 0 writes metrics.jsonl and TensorBoard)."""

    def log(self, kind: str, step: int, **values: Any) -> dict[str, Any]:
        return {}

    def keep_only(self, keep: Callable[[dict[str, Any]], bool]) -> int:
        return 0

    def close(self) -> None:
        pass
