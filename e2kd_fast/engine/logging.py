"""Run logging: ``metrics.jsonl`` in the run folder (one JSON object per line) and TensorBoard."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


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
