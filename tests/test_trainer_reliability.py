"""What survives a kill, a signal, a full disk, a non-finite step and a changed config (docs/reliability.md).

Tiny models and images (`tests.test_trainer`): every test trains a few steps on the CPU.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from e2kd_fast.cli import main
from e2kd_fast.config import Config, config_from_dict, load_config
from e2kd_fast.engine import Trainer, TrainingError, TrainingInterrupted, build_student, read_metrics
from e2kd_fast.models import read_checkpoint
from tests.helpers import write_image_folder
from tests.test_trainer import ShapesSet, _config, _fit_until_interrupted, _tiny_bcos

ROOT = Path(__file__).resolve().parents[1]


def _make(tmp_path, n_train: int = 40, **sections) -> Trainer:
    """A trainer of the tiny B-cos CNNs on 40 shapes: 5 optimiser steps per epoch."""
    cfg = config_from_dict(_config(tmp_path, **sections))
    return Trainer(
        cfg,
        ShapesSet(n_train, seed=0),
        ShapesSet(16, seed=9),
        student=_tiny_bcos(2),
        teacher=_tiny_bcos(1),
        show_progress=False,
    )


def _last(tmp_path) -> dict:
    return read_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")


def _all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


# ---------------------------------------------------------------------------------------------------- the seed


def test_train_seed_seeds_the_initial_weights(tmp_path):
    """Models built from the config (student, teacher, a baseline's connectors) depend on train.seed alone."""

    def config(seed: int) -> Config:
        return config_from_dict(_config(tmp_path, distill={"method": "reviewkd"}, train={"seed": seed}))

    first = Trainer(config(0), ShapesSet(16, seed=0), None, show_progress=False)
    torch.rand(5)  # what the process drew before changes nothing
    second = Trainer(config(0), ShapesSet(16, seed=0), None, show_progress=False)
    other = build_student(config(1))
    for a, b in zip(first.student.state_dict().values(), second.student.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    pairs = zip(first.student.parameters(), other.parameters(), strict=True)
    assert not all(torch.equal(a, c) for a, c in pairs)
    for a, b in zip(first.teacher.parameters(), second.teacher.parameters(), strict=True):
        assert torch.equal(a, b)
    connectors = [first.step_fn.extra_parameters(), second.step_fn.extra_parameters()]
    assert connectors[0] and all(torch.equal(a, b) for a, b in zip(*connectors, strict=True))


# ---------------------------------------------------------------------------------------------------- best-k files


def test_resuming_a_copied_run_deletes_nothing_outside_it(tmp_path):
    """The kept-best list is relative to the run folder; old absolute entries mean the copy's own files."""
    original = tmp_path / "a" / "run"
    _fit_until_interrupted(_make(tmp_path / "a", train={"epochs": 3, "keep_best": 1}), 11)
    kept = sorted(p.name for p in (original / "checkpoints").glob("epoch_*.pt"))
    assert len(kept) == 1
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    copy = tmp_path / "b" / "run"
    # A checkpoint written before entries were relative: absolute paths into the original folder.
    last = torch.load(copy / "checkpoints" / "last.pt", weights_only=True)
    last["best"] = [[m, str(original / "checkpoints" / Path(p).name)] for m, p in last["best"]]
    torch.save(last, copy / "checkpoints" / "last.pt")

    resumed = _make(tmp_path / "b", train={"epochs": 3, "keep_best": 1})
    resumed.evaluate = lambda: {"top1": 1.0}  # epoch 3 is the best: the kept epoch file is dropped
    summary = resumed.fit(resume="auto")

    assert sorted(p.name for p in (original / "checkpoints").glob("epoch_*.pt")) == kept
    assert sorted(p.name for p in (copy / "checkpoints").glob("epoch_*.pt")) == ["epoch_0003.pt"]
    # summary.json names it absolutely (usable from any directory); the checkpoint keeps it relative.
    assert [b["checkpoint"] for b in summary["best"]] == [str((copy / "checkpoints" / "epoch_0003.pt").resolve())]
    assert [p for _, p in _last(tmp_path / "b")["best"]] == ["checkpoints/epoch_0003.pt"]


# ---------------------------------------------------------------------------------------------------- non-finite steps


def test_a_non_finite_gradient_is_neither_applied_nor_saved(tmp_path):
    trainer = _make(tmp_path, train={"epochs": 2, "checkpoint_every_steps": 1})
    original = trainer._objective

    def nan_gradient(batch):
        out = original(batch)
        if trainer.state.step == 3:  # the loss stays finite; its gradient is NaN
            out["loss"].register_hook(lambda grad: grad * float("nan"))
        return out

    trainer._objective = nan_gradient
    with pytest.raises(
        TrainingError, match=r"non-finite gradient at step 3 .*not applied.*last\.pt, step 3\) is intact"
    ):
        trainer.fit()
    assert _last(tmp_path)["step"] == 3
    assert _all_finite(_last(tmp_path)["model"]) and _all_finite(trainer.student.state_dict())
    assert _make(tmp_path, train={"epochs": 2, "checkpoint_every_steps": 1}).fit(resume="auto")["steps"] == 10


def test_a_nan_in_the_first_batch_names_no_missing_checkpoint(tmp_path):
    trainer = _make(tmp_path)
    original = trainer._objective
    trainer._objective = lambda batch: {**(out := original(batch)), "loss": out["loss"] * float("nan")}
    with pytest.raises(TrainingError, match="non-finite loss") as err:
        trainer.fit()
    assert "last.pt" not in str(err.value) and "no checkpoint" in str(err.value)
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_non_finite_weights_are_never_saved(tmp_path):
    trainer = _make(tmp_path, train={"checkpoint_every_steps": 1})
    original = trainer._optimizer_step

    def corrupting_step():
        original()
        if trainer.state.step == 2:  # whatever wrote it: the third step's weights hold a NaN
            next(trainer.student.parameters()).data[0] = float("nan")

    trainer._optimizer_step = corrupting_step
    with pytest.raises(TrainingError, match=r"non-finite .* at step 3.* not saved.*last\.pt, step 2\) is intact"):
        trainer.fit()
    assert _last(tmp_path)["step"] == 2 and _all_finite(_last(tmp_path)["model"])


# ---------------------------------------------------------------------------------------------------- a full disk


@pytest.mark.parametrize(
    "failure",
    [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("unexpected pos 1674496 vs 1674388")],
    ids=["enospc", "zip-writer"],
)
def test_a_full_disk_names_the_file_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, failure):
    trainer = _make(tmp_path, train={"checkpoint_every_steps": 2})
    real_save, calls = torch.save, []

    def save_until_full(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"half a checkpoint")
            raise failure
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    last_pt = tmp_path / "run" / "checkpoints" / "last.pt"
    with pytest.raises(TrainingError) as err:
        trainer.fit()
    message = str(err.value)
    assert str(last_pt) in message and str(failure.args[-1]) in message and "free" in message
    assert "at step 4" in message and f"({last_pt}, step 2) is intact" in message
    assert _last(tmp_path)["step"] == 2
    assert [p.name for p in last_pt.parent.iterdir()] == ["last.pt"]  # the partial file is gone
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and str(last_pt) in summary["error"] and summary["steps"] == 4


def test_a_failed_metrics_write_names_the_file(tmp_path, monkeypatch):
    trainer = _make(tmp_path)
    metrics = tmp_path / "run" / "metrics.jsonl"
    real_open = Path.open

    def full_open(self, mode="r", *args, **kwargs):
        if self == metrics and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", full_open)
    with pytest.raises(TrainingError, match=re.escape(f"could not write {metrics}: No space left on device")):
        trainer.fit()


def test_stale_temporary_files_are_removed_at_start(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    stale = [
        checkpoints / ".last.pt.k2j4x8.tmp",
        checkpoints / ".epoch_0001.pt.a1b2c3.tmp",
        checkpoints.parent / ".config.yaml.tmp",
    ]
    for path in [*stale, checkpoints / "notes.txt"]:
        path.write_bytes(b"x")
    _make(tmp_path, train={"epochs": 1}).fit()
    assert not any(path.exists() for path in stale) and (checkpoints / "notes.txt").exists()


# ---------------------------------------------------------------------------------------------------- changed configs


def test_a_resume_refuses_changes_that_break_exactness(tmp_path):
    _fit_until_interrupted(_make(tmp_path, train={"epochs": 2, "checkpoint_every_steps": 3}), 4)
    config_yaml = (tmp_path / "run" / "config.yaml").read_text()
    changed = _make(tmp_path, train={"epochs": 2, "seed": 3}, data={"batch_size": 4}, optim={"name": "sgd"})
    with pytest.raises(TrainingError) as err:
        changed.fit(resume="auto")
    message = str(err.value)
    for change in ("train.seed: 0 → 3", "data.batch_size: 8 → 4", "optim.name: 'adam' → 'sgd'", "resume-force"):
        assert change in message
    assert "train.epochs" not in message
    assert (tmp_path / "run" / "config.yaml").read_text() == config_yaml
    assert _last(tmp_path)["step"] == 3


def test_a_forced_resume_from_adam_to_sgd_starts_the_optimiser_afresh(tmp_path):
    _make(tmp_path, train={"epochs": 1}).fit()
    forced = _make(tmp_path, train={"epochs": 2}, optim={"name": "sgd"})
    assert forced.fit(resume="auto", resume_force=True)["steps"] == 10
    assert isinstance(forced.optimizer, torch.optim.SGD)
    (record,) = read_metrics(tmp_path / "run", "resume")
    assert record["step"] == 5 and record["forced"] and record["changes"]["optim.name"] == ["adam", "sgd"]


def test_a_resume_logs_harmless_changes_and_keeps_the_original_config(tmp_path):
    _make(tmp_path, train={"epochs": 1}).fit()
    config_yaml = (tmp_path / "run" / "config.yaml").read_text()
    trainer = _make(tmp_path, train={"epochs": 2, "log_every_steps": 2}, data={"eval_batch_size": 4})
    assert trainer.fit(resume="auto")["steps"] == 10
    (record,) = read_metrics(tmp_path / "run", "resume")
    assert record["changes"] == {
        "train.epochs": [1, 2],
        "train.log_every_steps": [1, 2],
        "data.eval_batch_size": [None, 4],
    }
    assert not record["forced"]
    assert (tmp_path / "run" / "config.yaml").read_text() == config_yaml


def test_a_resume_drops_the_records_after_its_checkpoint(tmp_path):
    _fit_until_interrupted(_make(tmp_path, train={"epochs": 2, "checkpoint_every_steps": 7}), 9)
    assert [r["step"] for r in read_metrics(tmp_path / "run", "train")] == list(range(1, 10))
    _make(tmp_path, train={"epochs": 2, "checkpoint_every_steps": 7}).fit(resume="auto")
    assert [r["step"] for r in read_metrics(tmp_path / "run", "train")] == list(range(1, 11))
    assert [r["epoch"] for r in read_metrics(tmp_path / "run", "eval")] == [1, 2]


def test_resuming_a_finished_run_keeps_its_summary(tmp_path):
    first = _make(tmp_path, train={"epochs": 1}).fit()
    again = _make(tmp_path, train={"epochs": 1}).fit(resume="auto")
    assert again["final_eval"] == first["final_eval"] and again["final_eval"]["images"] == 16
    assert again["best"] == first["best"] and again["steps"] == first["steps"] == 5


def test_evaluation_metrics_are_stored_as_plain_values(tmp_path):
    """The last evaluation goes into every checkpoint, which must stay loadable with weights_only=True."""
    trainer = _make(tmp_path, train={"epochs": 1})
    trainer.evaluate = lambda: {"top1": np.float64(0.5), "images": torch.tensor(16), "groups": {0: np.float32(1.0)}}
    trainer.fit()
    assert _last(tmp_path)["last_eval"] == {"top1": 0.5, "images": 16, "groups": {"0": 1.0}}


# ---------------------------------------------------------------------------------------------------- signals


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["sigterm", "sigint"])
def test_a_signal_finishes_the_step_writes_last_pt_and_stops(tmp_path, signum, code):
    trainer = _make(tmp_path, train={"epochs": 2})
    original = trainer._optimizer_step

    def signalled_step():
        original()
        if trainer.state.step == 2:  # the third step: the signal arrives before it is counted
            os.kill(os.getpid(), signum)

    trainer._optimizer_step = signalled_step
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as err:
        trainer.fit()
    assert err.value.exit_code == code and signal.Signals(signum).name in str(err.value)
    assert _last(tmp_path)["step"] == 3 and "--resume auto" in str(err.value)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "interrupted"
    assert _make(tmp_path, train={"epochs": 2}).fit(resume="auto")["steps"] == 10


def test_sigterm_through_the_command_line_exits_143_and_says_how_to_resume(tmp_path, monkeypatch, capsys):
    root = write_image_folder(tmp_path / "data", classes=2, per_split={"train": 4, "val": 1}, size=(16, 16))
    cfg = {
        "student": {"name": "bcos_resnet20_cifar", "num_classes": 2},
        "distill": {"method": "none"},
        "data": {"root": str(root), "image_size": 16, "eval_resize": 16, "batch_size": 4, "num_workers": 0},
        "train": {"epochs": 2, "out_dir": str(tmp_path / "run"), "device": "cpu", "compile": False},
    }
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    original = Trainer._optimizer_step

    def signalled_step(self):
        original(self)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "_optimizer_step", signalled_step)
    assert main(["train", "--config", str(config), "--set", "train.keep_best=1", "--no-progress"]) == 143
    err = capsys.readouterr().err
    assert "SIGTERM" in err and f"e2kd-fast train --config {config} --set train.keep_best=1 --resume auto" in err
    assert _last(tmp_path)["step"] == 1


def test_time_based_checkpoints(tmp_path):
    _fit_until_interrupted(_make(tmp_path, train={"epochs": 2, "checkpoint_every_minutes": 1e-9}), 3)
    assert _last(tmp_path)["step"] == 3


def test_the_paper_imagenet_configs_checkpoint_every_few_minutes():
    files = sorted(ROOT.glob("configs/imagenet*.yaml")) + sorted(ROOT.glob("configs/baselines/imagenet*.yaml"))
    assert len(files) >= 18
    for path in files:
        minutes = load_config(path).train.checkpoint_every_minutes
        assert minutes is not None and minutes <= 30, path
