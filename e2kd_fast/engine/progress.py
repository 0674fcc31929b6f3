"""Honest progress numbers: the throughput of recent training steps and the run's ETA from it.

A run's wall time holds more than training steps: compiling graphs (minutes, once), evaluations and
checkpoints. A cumulative average over all of it says little about the speed of the step, and an ETA
from it jumps whenever a compile ends. Here the throughput is measured over a sliding window of the
most recent training steps, each timed from fetching its batch to its optimiser step; the trainer
leaves out steps that compiled a graph, and evaluations and checkpoints are never inside a step. The
run's one ETA is the remaining steps at the window's time per step, plus the remaining epoch ends
(evaluation, checkpoint) at the duration of the last one measured.
"""

from __future__ import annotations

import math
from collections import deque

DEFAULT_WINDOW_STEPS = 50


class ThroughputWindow:
    """Images per second and seconds per step over the last ``steps`` training steps added.

    Args:
        steps: the window's length in steps (> 0).
    """

    def __init__(self, steps: int = DEFAULT_WINDOW_STEPS) -> None:
        if steps < 1:
            raise ValueError(f"the throughput window needs at least one step; got {steps}")
        self._steps: deque[tuple[float, int]] = deque(maxlen=steps)

    def add(self, seconds: float, images: int) -> None:
        """One training step: its wall time and the images it used (on all ranks)."""
        if seconds > 0 and math.isfinite(seconds):
            self._steps.append((float(seconds), int(images)))

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def images_per_second(self) -> float | None:
        """Images of the window's steps over their time; None before any step was added."""
        seconds = sum(s for s, _ in self._steps)
        return sum(n for _, n in self._steps) / seconds if seconds > 0 else None

    @property
    def seconds_per_step(self) -> float | None:
        """Mean wall time of the window's steps; None before any step was added."""
        return sum(s for s, _ in self._steps) / len(self._steps) if self._steps else None

    def eta(self, steps_left: int, other_seconds: float = 0.0) -> float | None:
        """Seconds until the run ends: ``steps_left`` at the window's time per step plus ``other_seconds``
        (the remaining evaluations and checkpoints); None before any step was added."""
        per_step = self.seconds_per_step
        if per_step is None:
            return None
        return max(steps_left, 0) * per_step + max(other_seconds, 0.0)


def format_duration(seconds: float | None) -> str:
    """``H:MM:SS``; ``?`` for an unknown (None or NaN) duration."""
    if seconds is None or math.isnan(seconds):
        return "?"
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


__all__ = ["DEFAULT_WINDOW_STEPS", "ThroughputWindow", "format_duration"]
