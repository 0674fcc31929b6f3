"""Mixed precision: the e²KD step under bf16 autocast on every back end, and fp16 training with a loss scale.

The GPU runs the step in bf16 (`train.precision: bf16`); CPU autocast exercises the same dtype mix
(conv outputs and sweep gradients in bf16, weights in fp32) through the ops and their backwards.
`train.precision: fp16` adds a dynamic loss scale: an overflowing step is skipped and the scale
halved; a resume restores the scale.
"""

from __future__ import annotations

import pytest
import torch

from e2kd_fast.config import config_from_dict
from e2kd_fast.engine import read_metrics
from e2kd_fast.engine.step import TrainStep
from e2kd_fast.models import create_model, read_checkpoint
from e2kd_fast.ops import backends
from tests.test_trainer import _config, _fit_until_interrupted, _trainer


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_e2kd_step_runs_under_bf16_autocast(backend):
    if backend not in backends.candidates("e2kd::distill_loss", "cpu"):
        pytest.skip(f"the {backend} back end is not available here")
    student = create_model("bcos_resnet20_cifar", num_classes=5)
    teacher = create_model("bcos_resnet20_cifar", num_classes=5).eval().requires_grad_(False)
    x = torch.rand(2, 6, 16, 16).contiguous(memory_format=torch.channels_last)
    with backends.use_backend(backend):
        step = TrainStep(student, teacher, lam=2.0)
        reference = step(x, None, 0)  # fp32
        reference["loss"].backward()
        reference_grads = [p.grad.clone() for p in student.parameters()]
        student.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = step(x, None, 0)
        out["loss"].backward()
    assert torch.isfinite(out["loss"])
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    # bf16 rounding, not a different step: the loss and gradient stay close to the fp32 ones.
    assert out["loss"].item() == pytest.approx(reference["loss"].item(), rel=5e-2)
    flat, flat_ref = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in reference_grads])
    assert torch.nn.functional.cosine_similarity(flat, flat_ref, dim=0) > 0.9


INITIAL_SCALE = 2.0**16  # torch.amp.GradScaler's default


def _overflow_at(trainer, step: int) -> None:
    """Step ``step``'s loss stays finite but its gradient is NaN: + sqrt(0 · Σw), whose derivative is inf · 0."""
    original = trainer._objective

    def objective(batch):
        out = original(batch)
        if trainer.state.step == step:
            weight = next(trainer.student.parameters())
            out = {**out, "loss": out["loss"] + (weight.sum() * 0.0).sqrt()}
        return out

    trainer._objective = objective


def _fp16_trainer(path, **train):
    return _trainer(path, train={"epochs": 2, "precision": "fp16", **train})


def test_an_overflowing_step_is_skipped_and_halves_the_loss_scale(tmp_path):
    trainer = _fp16_trainer(tmp_path)
    _overflow_at(trainer, 1)  # the second step (steps count from 0 before they are applied)
    applied = []
    original_step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: applied.append(trainer.state.step) or original_step(*a, **k)
    dtypes = []

    class RecordingStep:  # the trainer's step, noting the autocast it runs under
        def __init__(self, step_fn):
            self.step_fn = step_fn

        def __getattr__(self, name):
            return getattr(self.step_fn, name)

        def __call__(self, *args):
            dtypes.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
            return self.step_fn(*args)

    trainer.step_fn = RecordingStep(trainer.step_fn)
    summary = trainer.fit()
    records = read_metrics(tmp_path / "run", "train")
    before, injected = records[0], records[1]
    # The injected step is skipped: its update is not applied, the scale halves, the count goes up.
    assert injected["loss_scale"] == before["loss_scale"] / 2
    assert injected["overflow_steps"] == before["overflow_steps"] + 1
    assert 1 not in applied
    # Any other skipped step is one fp16 overflowed by itself (the scale starts at 2^16 and comes down).
    assert summary["status"] == "finished" and len(applied) == 10 - summary["overflow_steps"]
    assert records[-1]["loss_scale"] == INITIAL_SCALE / 2 ** summary["overflow_steps"]
    assert all(torch.isfinite(v).all() for v in trainer.student.state_dict().values())
    # The student ran under the trainer's fp16 autocast.
    assert dtypes and set(dtypes) == {torch.float16}


def test_a_resumed_fp16_run_restores_the_loss_scale_and_repeats_the_uninterrupted_run(tmp_path):
    full = _fp16_trainer(tmp_path / "a")
    _overflow_at(full, 1)
    full.fit()
    reference = read_metrics(tmp_path / "a" / "run", "train")

    interrupted = _fp16_trainer(tmp_path / "b", checkpoint_every_steps=7)
    _overflow_at(interrupted, 1)
    _fit_until_interrupted(interrupted, 8)
    last = read_checkpoint(tmp_path / "b" / "run" / "checkpoints" / "last.pt")
    at_7 = next(r for r in reference if r["step"] == 7)
    assert last["grad_scaler"]["scale"] == at_7["loss_scale"] < INITIAL_SCALE
    assert last["overflow_steps"] == at_7["overflow_steps"] >= 1

    resumed = _fp16_trainer(tmp_path / "b", checkpoint_every_steps=7)
    resumed.fit(resume="auto")
    records = read_metrics(tmp_path / "b" / "run", "train")
    assert [(r["loss"], r["loss_scale"]) for r in records] == [(r["loss"], r["loss_scale"]) for r in reference]
    for a, b in zip(resumed.student.state_dict().values(), full.student.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_fp16_is_refused_under_deepspeed(tmp_path):
    cfg = _config(tmp_path, train={"precision": "fp16"}, engine={"strategy": "deepspeed"})
    with pytest.raises(ValueError, match="train.precision 'fp16' is not available with engine.strategy 'deepspeed'"):
        config_from_dict(cfg)
