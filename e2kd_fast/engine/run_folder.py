"""The run folder (``train.out_dir``): a fresh one per run by default, and never two runs in one.

A run that starts without resuming into a folder that already holds a run's files would append its
records to the other run's ``metrics.jsonl`` and TensorBoard events (steps 1, 2, 1, 2, ...). Such a
start is refused (`check_fresh_start`) unless the earlier run's files are cleared first
(`clear_run_files`: ``--overwrite``); files that are not a run's are never touched.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

from e2kd_fast.config import Config

# What a run writes into its folder besides checkpoints/*.pt and tb/ (engine.trainer, engine.logging);
# nothing else is cleared.
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "train.log")


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked (it holds another run, or none can be chosen)."""


def default_run_dir(config_path: str | os.PathLike | None = None, now: float | None = None) -> Path:
    """``runs/<config file stem>-<YYYYmmdd-HHMMSS>`` (``runs/train-...`` without a file), local time.

    A folder of that name that exists already (two runs started in the same second) gets ``-2``, ``-3``, ...
    """
    stem = Path(config_path).stem if config_path is not None else "train"
    base = Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def with_run_dir(
    cfg: Config, config_path: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None
) -> Config:
    """``cfg`` with ``train.out_dir`` chosen when it is None: ``out_dir`` when given (a resumed
    checkpoint's run folder), else a new dated folder (`default_run_dir`).

    Raises:
        RunFolderError: a multi-process launch (``WORLD_SIZE`` > 1) without ``train.out_dir``: each
            process would choose its own dated folder.
    """
    if cfg.train.out_dir is not None:
        return cfg
    if out_dir is not None:
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=Path(out_dir).as_posix()))
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise RunFolderError(
            "train.out_dir is not set: a multi-process launch needs it (each process would pick its own dated "
            "folder); set it in the config or with --set train.out_dir=runs/NAME"
        )
    return with_run_dir(cfg, out_dir=default_run_dir(config_path))


def run_files(run_dir: str | os.PathLike) -> list[Path]:
    """The files of a run found in ``run_dir``, sorted: `RUN_FILES`, the checkpoints (``checkpoints/*.pt``)
    and the TensorBoard folder (``tb/``, when it holds anything)."""
    run_dir = Path(run_dir)
    found = [run_dir / name for name in RUN_FILES if (run_dir / name).is_file()]
    checkpoints, events = run_dir / "checkpoints", run_dir / "tb"
    if checkpoints.is_dir():
        found += [p for p in checkpoints.glob("*.pt") if p.is_file()]
    if events.is_dir() and not events.is_symlink() and any(events.iterdir()):
        found.append(events)
    return sorted(found)


def check_fresh_start(run_dir: str | os.PathLike) -> None:
    """Raises `RunFolderError` when ``run_dir`` holds another run's files, naming them and the ways on.

    The message names the folder, the files found, ``--resume auto``, ``--overwrite`` and another
    ``train.out_dir``.
    """
    run_dir = Path(run_dir)
    found = run_files(run_dir)
    if found:
        names = ", ".join(p.relative_to(run_dir).as_posix() + ("/" if p.is_dir() else "") for p in found)
        raise RunFolderError(
            f"{run_dir} already holds a run ({names}); a new run there would mix its logs with that one's. "
            "Go on with it (e2kd-fast train --resume auto), start it over and delete those files "
            "(--overwrite; Trainer.fit(overwrite=True)), or choose another train.out_dir"
        )


def clear_run_files(run_dir: str | os.PathLike) -> list[Path]:
    """Deletes the run's files in ``run_dir`` (`run_files`); anything else stays. Returns what it deleted."""
    found = run_files(run_dir)
    for path in found:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    return found


__all__ = [
    "RUN_FILES",
    "RunFolderError",
    "check_fresh_start",
    "clear_run_files",
    "default_run_dir",
    "run_files",
    "with_run_dir",
]
