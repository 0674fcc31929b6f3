"""Progress and the run log: windowed throughput and ETA, train.log and its lines, train.compile auto, TF32,
and the compiled step's static batch size."""

from __future__ import annotations

import logging
import os
import re
import sys

import pytest
import torch

from e2kd_fast.config import config_from_dict
from e2kd_fast.engine import Trainer, read_metrics
from e2kd_fast.engine.builders import compile_cache_dir, cuda_math_settings, resolve_compile
from e2kd_fast.engine.logging import LOGGER_NAME, run_log
from e2kd_fast.engine.progress import ThroughputWindow, format_duration
from e2kd_fast.engine.resume import config_changes
from e2kd_fast.engine.step import CompileWatch
from tests.test_trainer import ShapesSet, _config, _tiny_bcos


def _fit(tmp_path, train_set=None, resume=None, **sections) -> Trainer:
    cfg = config_from_dict(_config(tmp_path, **sections))
    trainer = Trainer(
        cfg,
        train_set or ShapesSet(40, seed=0),
        ShapesSet(8, seed=9),
        student=_tiny_bcos(2),
        teacher=_tiny_bcos(1),
        show_progress=False,
    )
    trainer.fit(resume=resume)
    return trainer


# ---------------------------------------------------------------------------------------------- throughput


def test_the_throughput_window_measures_recent_steps_only():
    window = ThroughputWindow(steps=3)
    assert window.images_per_second is None and window.seconds_per_step is None and window.eta(10) is None
    window.add(10.0, 8)  # a slow first step: it leaves the window after three more
    for _ in range(3):
        window.add(0.5, 8)
    assert len(window) == 3
    assert window.images_per_second == pytest.approx(16.0)
    assert window.seconds_per_step == pytest.approx(0.5)
    # The remaining steps at the window's pace, plus what the caller adds (evaluations, checkpoints).
    assert window.eta(100) == pytest.approx(50.0)
    assert window.eta(100, other_seconds=12.0) == pytest.approx(62.0)
    assert window.eta(-3) == 0.0
    window.add(0.0, 8)  # a step without a measurable time is not counted
    window.add(float("nan"), 8)
    assert window.images_per_second == pytest.approx(16.0)
    with pytest.raises(ValueError, match="at least one step"):
        ThroughputWindow(steps=0)


def test_durations_read_as_hours_minutes_seconds():
    assert format_duration(3725.9) == "1:02:05"
    assert format_duration(59) == "0:00:59"
    assert format_duration(-4) == "0:00:00"
    assert format_duration(None) == format_duration(float("nan")) == "?"


def test_a_compiling_step_is_left_out_of_the_throughput(tmp_path, caplog):
    cfg = config_from_dict(_config(tmp_path, train={"epochs": 1}))
    trainer = Trainer(cfg, ShapesSet(16, seed=0), student=_tiny_bcos(2), teacher=_tiny_bcos(1), show_progress=False)

    class Watch:
        def __init__(self, records):
            self.records = records

        def new(self):
            return self.records

    trainer._compile_watch = Watch([object()])
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        trainer._measure_step(95.0, 8)
    assert len(trainer._throughput) == 0
    assert "compiled 1 graph(s) and took 95.0 s (left out of img/s and the ETA)" in caplog.text
    trainer._compile_watch = Watch([])
    trainer._measure_step(0.5, 8)
    assert trainer._throughput.images_per_second == pytest.approx(16.0)


# ---------------------------------------------------------------------------------------------- the run log


def test_train_log_holds_the_summary_and_a_line_per_epoch_and_a_resume_appends(tmp_path):
    run = tmp_path / "run"
    trainer = _fit(tmp_path, train={"epochs": 1, "checkpoint_every_steps": 2})
    first = (run / "train.log").read_text()
    lines = first.splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO ", line) for line in lines)
    # The start-up summary, once.
    for expected in (
        f"starting a new run in {run}",
        "data: 4 classes, 40 training images, 8 validation images",
        "student bcos_resnet20_cifar (1,056 parameters), teacher bcos_resnet20_cifar (1,056 parameters, live)",
        "schedule: 1 epochs × 5 steps = 5 optimiser steps of 8 images",
        "device: cpu (1 process, single), precision fp32",
        "train.compile false: the step runs eagerly on cpu",
        f"out_dir: {run.resolve()}",
        "saved checkpoints/last.pt at step 2 in",
        "evaluated after epoch 1: 8 validation images in",
        "saved checkpoints/epoch_0001.pt, checkpoints/last.pt at step 5 in",
        "finished: 5 steps, 1 epochs in",
    ):
        assert sum(expected in line for line in lines) == 1, (expected, first)
    if sys.platform.startswith("linux"):  # the heap policy a CPU run pins, on the device line
        assert any("device: cpu" in line and "; cpu heap: " in line for line in lines), first
    epoch_lines = [line for line in lines if " epoch 1/1 " in line]
    assert len(epoch_lines) == 1
    assert re.search(
        r"epoch 1/1 step 5/5: loss \d+\.\d{4}, \d+\.\d img/s, elapsed \d:\d\d:\d\d, ETA 0:00:00, "
        r"train top1 \d\.\d{4}; eval top1 \d\.\d{4}, top5 \d\.\d{4}, agreement",
        epoch_lines[0],
    ), epoch_lines[0]
    # metrics.jsonl's img_s is the same windowed number: training steps only, a positive rate.
    records = read_metrics(run, "train")
    assert all(r["img_s"] > 0 for r in records)
    assert records[-1]["img_s"] == round(trainer._throughput.images_per_second, 1)

    # A resumed run (one more epoch) continues the same file.
    _fit(tmp_path, train={"epochs": 2, "checkpoint_every_steps": 2}, resume="auto")
    text = (run / "train.log").read_text()
    assert text.startswith(first)
    added = text[len(first) :]
    assert f"resuming from {run / 'checkpoints' / 'last.pt'} at step 5 of 10 (epoch 2)" in added
    assert added.index("resuming from") < added.index("resume: train.epochs: 1 → 2")
    assert re.search(r"epoch 2/2 step 10/10: loss \d+\.\d{4}", added)


def test_skipped_images_and_a_short_last_step_are_logged(tmp_path):
    _fit(
        tmp_path,
        train_set=ShapesSet(36, seed=0, unreadable=(3,)),
        data={"drop_last": False},
        train={"epochs": 1, "log_every_steps": 50},
    )
    text = (tmp_path / "run" / "train.log").read_text()
    assert re.search(r"step \d: 1 unreadable image\(s\) left out \(1 in the run so far\)", text)
    assert (
        "schedule: 1 epochs × 5 steps = 5 optimiser steps of 8 images (data.batch_size 8 × train.grad_accum 1); "
        "each epoch's last step has 4" in text
    )


def test_the_console_gets_the_lines_through_tqdm_unless_logging_is_configured(tmp_path, capsys, monkeypatch):
    log = logging.getLogger(f"{LOGGER_NAME}.train")
    with run_log(tmp_path, console=True):
        log.info("epoch 1/1 line")
    assert "epoch 1/1 line" in capsys.readouterr().err
    assert "epoch 1/1 line" in (tmp_path / "train.log").read_text()
    assert not logging.getLogger(LOGGER_NAME).handlers  # detached after the block
    # Without logging of the application's own (the command line), the console is on by default.
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    with run_log(tmp_path):
        log.info("second line")
    assert "second line" in capsys.readouterr().err
    # Ranks other than 0 write nothing.
    other = tmp_path / "rank1"
    other.mkdir()
    with run_log(other, enabled=False):
        log.info("not written")
    assert not (other / "train.log").exists() and "not written" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- compile auto


def test_train_compile_auto_compiles_on_cuda_only_and_says_so(tmp_path):
    assert config_from_dict(_config(tmp_path, train={"compile": "auto"})).train.compile == "auto"
    del_compile = _config(tmp_path)
    del del_compile["train"]["compile"]
    assert config_from_dict(del_compile).train.compile == "auto"  # the default
    on, note = resolve_compile("auto", torch.device("cuda"))
    assert on and note == "train.compile auto: the step is compiled on cuda"
    on, note = resolve_compile("auto", torch.device("cpu"))
    assert not on and "eagerly on cpu" in note and "train.compile: true" in note
    assert resolve_compile(True, torch.device("cpu"))[0] and not resolve_compile(False, torch.device("cuda"))[0]
    with pytest.raises(ValueError, match=r"train\.compile: expected bool or 'auto', got str 'maybe'"):
        config_from_dict(_config(tmp_path, train={"compile": "maybe"}))
    # A run on the CPU with the default trains eagerly and logs why.
    trainer = _fit(tmp_path, train={"epochs": 1, "compile": "auto"})
    assert trainer.compile is False and trainer.step_fn.compile is False
    assert "train.compile auto: the step runs eagerly on cpu" in (tmp_path / "run" / "train.log").read_text()
    # A run folder written with compile: true resumes under auto: a harmless change, like tf32.
    saved, new = _config(tmp_path, train={"compile": True}), _config(tmp_path, train={"compile": "auto", "tf32": False})
    assert all(c.harmless for c in config_changes(saved, new))


def test_the_compile_cache_outlives_the_temporary_folder_unless_one_is_set(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache_dir() == tmp_path / "xdg" / "e2kd-fast" / "inductor"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "xdg" / "e2kd-fast" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache_dir() == tmp_path / "mine"


def test_tf32_and_cudnn_benchmark_apply_on_cuda_only_and_are_restored():
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    with cuda_math_settings(torch.device("cpu"), tf32=True, cudnn_benchmark=True) as note:
        assert note is None
        now = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
        assert now == before
    # The flags are plain process settings: they can be set (and checked) without a GPU.
    with cuda_math_settings(torch.device("cuda"), tf32=True, cudnn_benchmark=True) as note:
        assert note == "cuda: TF32 on, cudnn.benchmark on"
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.benchmark
    with cuda_math_settings(torch.device("cuda"), tf32=False, cudnn_benchmark=False):
        assert torch.get_float32_matmul_precision() == "highest"
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cudnn.benchmark
    after = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    assert after == before


# ---------------------------------------------------------------------------------------------- static batch shapes


def test_compiled_graphs_see_only_full_batches_and_short_ones_run_eagerly(tmp_path, monkeypatch):
    """An unreadable image and the epoch's kept last step make short batches: they run the eager function
    (same loss), so the compiled graph is never called with, and never recompiled for, another size."""
    seen: list[int] = []

    def recording_compile(fn, fullgraph=False, options=None):  # stands in for Inductor: records the calls
        assert fullgraph

        def compiled(images, *args):
            seen.append(int(images.shape[0]))
            return fn(images, *args)

        return compiled

    monkeypatch.setattr(torch, "compile", recording_compile)
    data = {"drop_last": False}  # 35 images of which 1 unreadable: 4 full steps of 8, one of 8 - 1, a tail of 3
    runs = {}
    for name, compile in (("compiled", True), ("eager", False)):
        _fit(
            tmp_path / name,
            train_set=ShapesSet(35, seed=0, unreadable=(3,)),
            data=data,
            train={"epochs": 1, "compile": compile},
        )
        runs[name] = read_metrics(tmp_path / name / "run", "train")
    assert seen and set(seen) == {8}  # the compiled graph saw full batches only
    images = [r["images"] for r in runs["compiled"]]
    assert sorted(images) == [3, 7, 8, 8, 8]
    assert len(seen) == 2 * images.count(8)  # per full step the live teacher's graph and the student's
    assert [r["loss"] for r in runs["compiled"]] == [r["loss"] for r in runs["eager"]]
    text = (tmp_path / "compiled" / "run" / "train.log").read_text()
    for size in (7, 3):
        assert f"a batch of {size} images (not 8) runs eagerly" in text
    assert "train.compile true: the step is compiled on cpu" in text


def test_the_compile_watch_reports_new_graphs_and_the_recompile_reason():
    def double_sum(x):
        return (x * 2).sum()

    compiled = torch.compile(double_sum, backend="eager", fullgraph=True)  # Dynamo only: a fraction of a second
    watch = CompileWatch()
    compiled(torch.ones(4, 3))
    (first,) = watch.new()
    assert first.recompile_reason is None
    compiled(torch.ones(4, 3))
    assert watch.new() == []
    compiled(torch.ones(5, 3))
    (again,) = watch.new()
    assert "size mismatch at index 0" in again.recompile_reason


def test_the_command_line_without_a_bar_prints_the_log_lines_and_keeps_stdout_for_the_summary(
    tmp_path, capsys, monkeypatch
):
    import json

    import yaml

    from e2kd_fast.cli import main
    from tests.helpers import write_image_folder
    from tests.test_cli_and_store import _config_dict

    folder = write_image_folder(tmp_path / "data", classes=3, per_split={"train": 4, "val": 2}, size=(24, 28))
    cfg = _config_dict(folder, tmp_path)
    del cfg["train"]["compile"]  # the default, auto: eager on this CPU
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in a plain `e2kd-fast train` process
    assert main(["train", "--config", str(config), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["steps"] == 3  # stdout: the summary alone
    assert "data: 3 classes (" in err and "12 training images, 6 validation images" in err
    assert "train.compile auto: the step runs eagerly on cpu" in err
    assert re.search(r"\] epoch 1/1 step 3/3: loss \d+\.\d{4}, \d+\.\d img/s, .*; eval top1", err)
    assert "epoch 1/1 step 3/3" in (tmp_path / "run" / "train.log").read_text()
