"""Run folders: no second run into one, a fresh folder per run by default, absolute summary paths,
ordinary file modes, and a default number of loader workers that fits the machine."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import yaml

from e2kd_fast.cli import main
from e2kd_fast.config import config_from_dict
from e2kd_fast.data import loaders
from e2kd_fast.data.waterbirds_synthetic import generate_waterbirds_like
from e2kd_fast.engine import read_metrics
from e2kd_fast.engine.run_folder import RunFolderError, default_run_dir, with_run_dir
from e2kd_fast.models import create_model, save_checkpoint
from e2kd_fast.report.build import load_run
from tests.helpers import write_image_folder

_PLAIN = {"student": {"name": "bcos_resnet20_cifar"}, "distill": {"method": "none"}}


def _config(tmp_path: Path, out_dir: str | None) -> Path:
    folder = write_image_folder(tmp_path / "data", classes=2, per_split={"train": 4, "val": 1}, size=(16, 16))
    cfg = {
        "student": {"name": "bcos_resnet20_cifar", "num_classes": 2},
        "distill": {"method": "none"},
        "data": {"root": str(folder), "image_size": 16, "eval_resize": 16, "batch_size": 4, "num_workers": 0},
        "train": {"epochs": 1, "device": "cpu", "log_every_steps": 1, "compile": False},
    }
    if out_dir is not None:
        cfg["train"]["out_dir"] = out_dir
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(config: Path, *extra: str) -> int:
    return main(["train", "--config", str(config), "--no-progress", *extra])


def test_a_second_run_into_a_used_folder_is_refused_and_overwrite_starts_over(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    config = _config(tmp_path, str(run))
    assert _train(config) == 0
    summary = json.loads(capsys.readouterr().out)
    steps = [r["step"] for r in read_metrics(run, "train")]
    (run / "notes.txt").write_text("mine")

    assert _train(config) == 2
    err = capsys.readouterr().err
    assert str(run) in err and "--resume auto" in err and "--overwrite" in err
    assert "metrics.jsonl" in err and "checkpoints/last.pt" in err
    assert [r["step"] for r in read_metrics(run, "train")] == steps  # nothing appended

    assert _train(config, "--overwrite") == 0
    capsys.readouterr()
    assert [r["step"] for r in read_metrics(run, "train")] == steps  # one run's records, not two
    assert (run / "notes.txt").read_text() == "mine"  # only the run's own files are cleared

    # Paths in summary.json are absolute: `--checkpoint best` works from any directory.
    best = summary["best"][0]["checkpoint"]
    assert Path(best).is_absolute() and Path(best).is_file() and Path(summary["run_dir"]) == run.resolve()
    monkeypatch.chdir(tmp_path / "data")
    assert load_run(run, checkpoint="best").checkpoint == Path(best)
    moved = shutil.move(run, tmp_path / "moved")  # a moved folder finds its own file of that name
    assert load_run(moved, checkpoint="best").checkpoint == Path(moved) / "checkpoints" / Path(best).name


def test_resume_auto_without_a_checkpoint_starts_over(tmp_path, capsys):
    run = tmp_path / "run"
    config = _config(tmp_path, str(run))
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 7, "time": 0}\n')  # a run killed before last.pt
    assert _train(config, "--resume", "auto") == 0
    assert [r["step"] for r in read_metrics(run, "train")] == [1, 2]  # the stale step 7 is gone

    # Epoch checkpoints without last.pt are another run's results: refused, not deleted.
    (run / "checkpoints" / "last.pt").unlink()
    assert _train(config, "--resume", "auto") == 2
    assert "--overwrite" in capsys.readouterr().err and list((run / "checkpoints").glob("*.pt"))


def test_the_default_run_folder_is_new_per_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _config(tmp_path, None)
    assert _train(config) == 0
    capsys.readouterr()
    (made,) = (tmp_path / "runs").iterdir()
    assert made.name.startswith("tiny-") and (made / "checkpoints" / "last.pt").is_file()
    # Two runs in the same second get distinct folders; the chosen one is in the saved config.
    first = default_run_dir(config, now=0.0)
    first.mkdir(parents=True)
    assert default_run_dir(config, now=0.0) == first.with_name(first.name + "-2")
    assert yaml.safe_load((made / "config.yaml").read_text())["train"]["out_dir"] == f"runs/{made.name}"

    assert _train(config, "--resume", "auto") == 2
    assert "--resume auto needs train.out_dir" in capsys.readouterr().err
    # --resume PATH goes on in the folder PATH lies in (here: a finished run, so nothing more is trained).
    assert _train(config, "--resume", str(made / "checkpoints" / "last.pt")) == 0
    assert json.loads(capsys.readouterr().out)["run_dir"] == str(made.resolve())
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted([made.name, first.name])


def test_a_multi_process_launch_needs_an_out_dir(monkeypatch):
    cfg = config_from_dict(_PLAIN)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RunFolderError, match="train.out_dir is not set"):
        with_run_dir(cfg)
    assert with_run_dir(config_from_dict({**_PLAIN, "train": {"out_dir": "r"}})).train.out_dir == "r"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoints_and_generated_data_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        path = save_checkpoint(create_model("bcos_resnet20_cifar", num_classes=2), tmp_path / "ckpt" / "last.pt")
        root = tmp_path / "birds"
        generate_waterbirds_like(root, image_size=16, per_split={"train_biased": 2, "val": 2}, seed=0)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(root.stat().st_mode) == 0o777 & ~umask


def test_default_num_workers_fits_the_machine(monkeypatch):
    monkeypatch.setattr(loaders.os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loaders.default_num_workers() == 1  # one core left for the training loop
    monkeypatch.setattr(loaders.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert loaders.default_num_workers() == loaders.MAX_DEFAULT_WORKERS
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert loaders.default_num_workers() == 7  # 64 cores shared by 8 processes
    assert loaders.resolve_num_workers(3) == 3
    assert config_from_dict(_PLAIN).data.num_workers is None
