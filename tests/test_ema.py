"""The EMA of the student's weights (``train.ema_decay``): the update, when it runs, checkpoints and an
exact resume, evaluation of the averaged weights, and eval / export of a checkpoint that holds them."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from e2kd_fast.cli import main
from e2kd_fast.config import config_from_dict
from e2kd_fast.engine import TrainingError, evaluate
from e2kd_fast.engine.ema import EmaWeights
from e2kd_fast.engine.process_group import find_free_port
from e2kd_fast.models import has_ema_weights, load_checkpoint, read_checkpoint
from tests.helpers import set_rank_environment, write_image_folder
from tests.test_distributed import KERNELS, WORLD, _assert_close, _spawn_with_deadline
from tests.test_distributed import _fit as _fit_on_strategy
from tests.test_trainer import _config, _fit_until_interrupted, _tiny_bcos, _trainer

DECAY = 0.5  # large steps: a few updates leave the average far from the raw weights


def _small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))


def _ema_of(path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["model_ema"]


def _assert_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].cpu(), b[key].cpu()), key


# ---------------------------------------------------------------------------------------------- the update


def test_the_update_matches_a_float64_hand_computation():
    model = _small_model()
    ema = EmaWeights(model, decay=0.9)
    expected = {k: v.double().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    for step in range(4):
        with torch.no_grad():  # stand-ins for an optimiser step and a forward that moves the running stats
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model[1].running_mean.add_(torch.randn(4))
            model[1].num_batches_tracked += step + 1
        ema.update(model)
        for key, value in model.state_dict().items():
            if key in expected:
                expected[key] = 0.9 * expected[key] + 0.1 * value.double()
    averaged = ema.state_dict()
    assert len(ema) == len(expected)  # every parameter and floating buffer, running statistics included
    for key, value in expected.items():
        assert averaged[key].dtype == torch.float32
        torch.testing.assert_close(averaged[key].double(), value, rtol=1e-6, atol=1e-6)
    assert torch.equal(averaged["1.num_batches_tracked"], model[1].num_batches_tracked)  # integers are copied


def test_applied_to_lends_the_averaged_weights_and_gives_the_raw_ones_back_bit_for_bit():
    model = _small_model()
    ema = EmaWeights(model, decay=DECAY)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    ema.update(model)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    with ema.applied_to(model):
        _assert_equal_states(model.state_dict(), ema.state_dict())
    _assert_equal_states(model.state_dict(), raw)
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))  # the optimiser's tensors


def test_a_decay_outside_0_1_is_refused():
    with pytest.raises(ValueError, match="decay must be in"):
        EmaWeights(_small_model(), decay=1.0)


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("value", [0, 1, 1.0, -0.1, 1.5, True, "0.99"])
def test_config_refuses_an_ema_decay_outside_0_1_naming_the_key_and_value(tmp_path, value):
    with pytest.raises(ValueError, match=r"train\.ema_decay") as err:
        config_from_dict(_config(tmp_path, train={"ema_decay": value}))
    assert repr(value) in str(err.value) or str(float(value)) in str(err.value)


def test_ema_is_off_by_default(tmp_path):
    assert config_from_dict(_config(tmp_path)).train.ema_decay is None


# ---------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """One epoch without an EMA: the trainer (its run folder: ``<tmp>/run``)."""
    trainer = _trainer(tmp_path_factory.mktemp("plain"), train={"epochs": 1})
    trainer.fit()
    return trainer


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """The same epoch with ``train.ema_decay``: the trainer."""
    trainer = _trainer(tmp_path_factory.mktemp("ema"), train={"epochs": 1, "ema_decay": DECAY})
    trainer.fit()
    return trainer


def _copy_run(trainer, tmp_path) -> None:
    """A copy of ``trainer``'s run folder at ``tmp_path / "run"``, for a resume that leaves the original as it was."""
    shutil.copytree(trainer.run_dir, tmp_path / "run")


def test_off_by_default_changes_nothing_and_on_it_changes_only_what_is_evaluated(plain_run, ema_run):
    plain, averaged = plain_run, ema_run
    assert plain.ema is None
    assert "model_ema" not in read_checkpoint(plain.ckpt_dir / "last.pt")
    assert not any(line.startswith("ema:") for line in plain.start_summary())
    assert any(line.startswith(f"ema: decay {DECAY}") for line in averaged.start_summary())
    # The raw student trains exactly as without an EMA; the evaluation sees other weights.
    _assert_equal_states(averaged.student.state_dict(), plain.student.state_dict())
    assert averaged.state.last_eval["loss"] != plain.state.last_eval["loss"]


def test_the_ema_updates_once_per_applied_optimiser_step(tmp_path):
    trainer = _trainer(tmp_path, n_train=48, train={"epochs": 1, "grad_accum": 2, "ema_decay": DECAY})
    updates: list[int] = []
    update, step = trainer.ema.update, trainer.strategy.step

    def counted(model):
        updates.append(trainer.state.step)
        update(model)

    def overflow_at_step_one():  # as a skipped fp16 step: nothing applied
        if trainer.state.step == 1:
            trainer.optimizer.zero_grad(set_to_none=True)
            return False
        return step()

    trainer.ema.update, trainer.strategy.step = counted, overflow_at_step_one
    trainer.fit()
    assert trainer.micro_batches == 2 and trainer.total_steps == 3
    assert updates == [0, 2]  # one per optimiser step, not per micro-batch; none for the skipped step
    assert trainer.state.overflow_steps == 1


def test_checkpoints_hold_the_ema_and_a_resume_continues_it_bit_for_bit(tmp_path):
    train = {"epochs": 1, "ema_decay": DECAY, "checkpoint_every_steps": 3}
    full = _trainer(tmp_path / "a", train=train)
    full.fit()
    checkpoints = tmp_path / "a" / "run" / "checkpoints"
    _assert_equal_states(_ema_of(checkpoints / "last.pt"), full.ema.state_dict())
    assert all("model_ema" in read_checkpoint(p) for p in checkpoints.glob("epoch_*.pt"))  # the kept best too

    _fit_until_interrupted(_trainer(tmp_path / "b", train=train), 4)  # stops after step 3 of 5, mid-epoch
    assert read_checkpoint(tmp_path / "b" / "run" / "checkpoints" / "last.pt")["step"] == 3
    resumed = _trainer(tmp_path / "b", train=train)
    resumed.fit(resume="auto")
    _assert_equal_states(resumed.ema.state_dict(), full.ema.state_dict())
    _assert_equal_states(resumed.student.state_dict(), full.student.state_dict())  # raw weights resumed, not EMA


def test_a_resume_that_changes_the_decay_is_refused(ema_run, tmp_path):
    _copy_run(ema_run, tmp_path)
    changed = _trainer(tmp_path, train={"epochs": 2, "ema_decay": 0.9})
    with pytest.raises(TrainingError, match=r"train\.ema_decay: 0\.5 → 0\.9"):
        changed.fit(resume="auto")


def test_a_forced_resume_that_turns_the_ema_on_starts_it_from_the_checkpoint(plain_run, tmp_path):
    _copy_run(plain_run, tmp_path)
    resumed = _trainer(tmp_path, train={"epochs": 1, "ema_decay": DECAY})
    resumed.fit(resume="auto", resume_force=True)  # the run is finished: nothing trains after the resume
    _assert_equal_states(resumed.ema.state_dict(), resumed.student.state_dict())
    assert "holds no EMA weights: the average starts from its weights" in (tmp_path / "run" / "train.log").read_text()


def test_evaluation_and_the_best_ranking_use_the_ema_weights(ema_run):
    trainer = ema_run
    raw = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    metrics = trainer.evaluate()
    _assert_equal_states(trainer.student.state_dict(), raw)  # the raw weights are back after it

    model = _tiny_bcos(0)
    model.load_state_dict(trainer.ema.state_dict())
    loader = trainer._loader(trainer.val_set, trainer.val_indices, shuffle=False, epoch=0, start=0, train=False)
    by_hand = evaluate(model, loader, teacher=trainer.teacher, explanation="bcos", device=trainer.device)
    for key in ("top1", "agreement", "explanation_cosine"):
        assert metrics[key] == pytest.approx(by_hand[key], abs=1e-6)
    assert metrics == trainer.state.last_eval  # what the run logged and ranked by
    assert trainer.state.best[0][0] == metrics["top1"]


def _ddp_worker(rank: int, port: int, root: str) -> None:
    set_rank_environment(rank, WORLD, port, KERNELS)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    _fit_on_strategy(Path(root) / "ddp", {"strategy": "ddp"}, {"ema_decay": DECAY}, {})
    dist.destroy_process_group()


def test_two_ddp_processes_average_what_one_process_averages(tmp_path, monkeypatch):
    monkeypatch.setenv("E2KD_BACKEND", KERNELS)
    single = _fit_on_strategy(tmp_path / "single", {"strategy": "single"}, {"ema_decay": DECAY}, {})
    failure = _spawn_with_deadline(_ddp_worker, (find_free_port(), str(tmp_path)), seconds=120)
    assert failure is None, failure
    saved = read_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")
    _assert_close(saved["model_ema"], single.ema.state_dict())  # the underlying student's weights, averaged
    assert any(not torch.equal(saved["model"][k], saved["model_ema"][k]) for k in saved["model"])


# ---------------------------------------------------------------------------------------------- files and CLI


def test_load_checkpoint_takes_the_ema_weights_unless_asked_for_the_raw_ones(ema_run):
    payload = read_checkpoint(ema_run.ckpt_dir / "last.pt")
    assert has_ema_weights(payload)
    model = _tiny_bcos(0)
    assert load_checkpoint(model, payload).ema
    _assert_equal_states(model.state_dict(), payload["model_ema"])
    assert not load_checkpoint(model, payload, use_ema=False).ema
    _assert_equal_states(model.state_dict(), payload["model"])
    # timm's train.py checkpoints: {"state_dict": ..., "state_dict_ema": ...}
    timm_style = {"state_dict": payload["model"], "state_dict_ema": payload["model_ema"], "epoch": 1}
    assert load_checkpoint(model, timm_style).kind == "wrapped:state_dict_ema"
    _assert_equal_states(model.state_dict(), payload["model_ema"])


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A tiny registered-model run with an EMA, trained through the command line: (config file, last.pt)."""
    tmp_path = tmp_path_factory.mktemp("ema_cli")
    folder = write_image_folder(tmp_path / "data", classes=3, per_split={"train": 4, "val": 1}, size=(20, 20))
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "student": {"name": "bcos_resnet20_cifar", "num_classes": 3, "kwargs": {"norm": "pn"}},
                "distill": {"method": "none"},
                "optim": {"lr": 0.1},
                "data": {"root": str(folder), "image_size": 16, "eval_resize": 16, "batch_size": 6, "num_workers": 0},
                "train": {
                    "epochs": 1,
                    "device": "cpu",
                    "compile": False,
                    "out_dir": str(tmp_path / "run"),
                    "ema_decay": DECAY,
                },
            }
        )
    )
    assert main(["train", "--config", str(config), "--no-progress"]) == 0
    return config, tmp_path / "run" / "checkpoints" / "last.pt"


def test_export_writes_the_ema_weights_and_says_so(cli_run, tmp_path, capsys):
    _, checkpoint = cli_run
    payload = read_checkpoint(checkpoint)
    assert any(not torch.equal(payload["model"][k], payload["model_ema"][k]) for k in payload["model"])
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "ema.pt")]) == 0
    assert "the EMA (averaged) weights" in capsys.readouterr().out
    exported = read_checkpoint(tmp_path / "ema.pt")
    assert "model_ema" not in exported  # one set of weights
    _assert_equal_states(exported["model"], payload["model_ema"])

    assert main(["export", str(checkpoint), "--out", str(tmp_path / "raw.pt"), "--no-ema"]) == 0
    assert "the raw weights (--no-ema)" in capsys.readouterr().out
    _assert_equal_states(read_checkpoint(tmp_path / "raw.pt")["model"], payload["model"])


def test_eval_of_a_checkpoint_uses_its_ema_weights_and_says_so(cli_run, tmp_path, capsys):
    config, checkpoint = cli_run
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "ema.pt")]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(checkpoint)]) == 0
    captured = capsys.readouterr()
    assert "holds EMA weights; using the EMA (averaged) weights" in captured.err
    from_checkpoint = json.loads(captured.out)
    assert main(["eval", "--checkpoint", str(tmp_path / "ema.pt"), "--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out) == from_checkpoint  # the same weights as the export's
    assert main(["eval", "--checkpoint", str(checkpoint), "--no-ema"]) == 0
    assert "using the raw weights (--no-ema)" in capsys.readouterr().err
