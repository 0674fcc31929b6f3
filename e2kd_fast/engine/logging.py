"""Run logging: ``metrics.jsonl`` in the run folder (one JSON object per line) and TensorBoard."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Appends records to ``<run>/metrics.jsonl`` and mirrors scalars to TensorBoard (``<run>/tb``).

    Each record has ``kind`` (``"train"``, ``"eval"``, ...), ``step``, ``time`` and its values. The
    JSONL file is appended to and flushed per record, so a resumed run continues the same file.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True) -> None:
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
                self._writer = SummaryWriter(log_dir=str(self.run_dir / "tb"))

    def log(self, kind: str, step: int, **values: Any) -> dict[str, Any]:
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **_plain(values)}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and not isinstance(value, bool) and key not in ("step", "time"):
                    self._writer.add_scalar(f"{kind}/{key}", value, step)
            self._writer.flush()
        return record

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

    def close(self) -> None:
        pass
