"""The trainer: exact resume, checkpoints (best-k + last), non-finite loss, logging, all methods."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import Dataset

from e2kd_fast import AddInverse
from e2kd_fast.config import config_from_dict
from e2kd_fast.data import shapes_dataset
from e2kd_fast.data.sampling import EpochSampler
from e2kd_fast.engine import Trainer, TrainingError, read_metrics
from e2kd_fast.models import read_checkpoint
from e2kd_fast.nn import BatchNormUncentered2d, BcosConv2d


class ShapesSet(Dataset):
    """In-memory shapes as the trainer sees data: encoded images with a random flip (augmentation)."""

    def __init__(self, n: int, seed: int, size: int = 16, unreadable: tuple[int, ...] = ()) -> None:
        images, self.targets, _ = shapes_dataset(n, size=size, seed=seed)
        self.images = AddInverse()(images)
        self.unreadable = set(unreadable)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        if i in self.unreadable:
            return None
        image = self.images[i]
        if torch.rand(()) < 0.5:  # draws from the torch RNG, like torchvision transforms
            image = image.flip(-1)
        return {"image": image, "target": int(self.targets[i]), "index": i}


def _tiny_bcos(seed: int) -> torch.nn.Module:
    """A small B-cos CNN, so that trainer tests take seconds; real models are tested elsewhere."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        BcosConv2d(6, 8, 3, padding=1),
        BatchNormUncentered2d(8),
        BcosConv2d(8, 8, 3, stride=2, padding=1),
        BatchNormUncentered2d(8),
        BcosConv2d(8, 4, 1),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    )
    net.num_classes = 4
    return net


def _tiny_bcos_without_norms(seed: int) -> torch.nn.Module:
    """`_tiny_bcos` without batch norm: a step's result does not depend on how it splits into micro-batches."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        BcosConv2d(6, 8, 3, padding=1),
        BcosConv2d(8, 8, 3, stride=2, padding=1),
        BcosConv2d(8, 4, 1),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    )
    net.num_classes = 4
    return net


def _config(tmp_path, **sections) -> dict:
    cfg = {
        "student": {"name": "bcos_resnet20_cifar", "num_classes": 4},
        "teacher": {"name": "bcos_resnet20_cifar", "num_classes": 4},
        "distill": {"method": "e2kd", "lam": 1.0},
        "optim": {"lr": 1e-3, "warmup_epochs": 1},
        "data": {"batch_size": 8, "num_workers": 0},
        "train": {
            "epochs": 2,
            "out_dir": str(tmp_path / "run"),
            "log_every_steps": 1,
            "device": "cpu",
            "compile": False,
        },
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def _trainer(tmp_path, n_train=40, teacher_seed=1, **sections) -> Trainer:
    cfg = config_from_dict(_config(tmp_path, **sections))
    teacher, student = _tiny_bcos(teacher_seed), _tiny_bcos(2)
    return Trainer(
        cfg, ShapesSet(n_train, seed=0), ShapesSet(16, seed=9), student=student, teacher=teacher, show_progress=False
    )


def _train_losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir, "train")]


def _fit_until_interrupted(trainer: Trainer, step: int) -> None:
    """Runs ``trainer.fit()`` until a failure just before optimiser step ``step`` is applied."""
    original = trainer._optimizer_step

    def failing_step():
        if trainer.state.step == step:
            raise KeyboardInterrupt
        original()

    trainer._optimizer_step = failing_step
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()


def test_resume_mid_epoch_reproduces_the_uninterrupted_run(tmp_path):
    full = _trainer(tmp_path / "a", train={"epochs": 2})
    full.fit()
    reference = _train_losses(tmp_path / "a" / "run")
    assert len(reference) == 2 * full.steps_per_epoch == 10

    # The same run, interrupted after 7 of 10 steps (mid-epoch 2) by a failure, then resumed.
    _fit_until_interrupted(_trainer(tmp_path / "b", train={"epochs": 2, "checkpoint_every_steps": 7}), 8)
    last = read_checkpoint(tmp_path / "b" / "run" / "checkpoints" / "last.pt")
    assert (last["step"], last["epoch"], last["step_in_epoch"]) == (7, 1, 2)

    resumed = _trainer(tmp_path / "b", train={"epochs": 2, "checkpoint_every_steps": 7})
    resumed.fit(resume="auto")
    losses = _train_losses(tmp_path / "b" / "run")
    records = read_metrics(tmp_path / "b" / "run", "train")
    after_resume = {r["step"]: r["loss"] for r in records[-3:]}
    assert after_resume == {8: reference[7], 9: reference[8], 10: reference[9]}
    assert losses[:7] == reference[:7]
    for a, b in zip(resumed.student.state_dict().values(), full.student.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_checkpoints_keep_best_k_and_last(tmp_path):
    trainer = _trainer(tmp_path, train={"epochs": 3, "keep_best": 2})
    summary = trainer.fit()
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.pt"))
    assert "last.pt" in ckpts and len(ckpts) == 3
    assert len(summary["best"]) == 2
    scores = [b["top1"] for b in summary["best"]]
    assert scores == sorted(scores, reverse=True)
    evals = read_metrics(tmp_path / "run", "eval")
    assert len(evals) == 3
    assert {"top1", "top5", "agreement", "explanation_cosine"} <= set(evals[-1])
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 15
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert any((tmp_path / "run" / "tb").iterdir())


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, train={"epochs": 2, "checkpoint_every_steps": 2})
    original = trainer._objective

    def poisoned(batch):
        out = original(batch)
        if trainer.state.step == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    trainer._objective = poisoned
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 3 .* last checkpoint .* intact"):
        trainer.fit()
    last = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["step"] == 2
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("method", ["none", "kd", "e2kd"])
def test_methods_train_and_count_skipped_images(tmp_path, method):
    cfg = config_from_dict(_config(tmp_path, distill={"method": method}, train={"epochs": 1}))
    teacher = None if method == "none" else _tiny_bcos(1)
    train, val = ShapesSet(40, seed=0, unreadable=(3, 5)), ShapesSet(8, seed=9)
    trainer = Trainer(cfg, train, val, student=_tiny_bcos(2), teacher=teacher, show_progress=False)
    summary = trainer.fit()
    assert summary["skipped_train_images"] == 2
    assert all(torch.isfinite(torch.tensor(x)) for x in _train_losses(tmp_path / "run"))


def test_gradient_accumulation_and_mixup(tmp_path):
    trainer = _trainer(tmp_path, data={"batch_size": 4, "mixup_alpha": 0.2}, train={"epochs": 1, "grad_accum": 2})
    summary = trainer.fit()
    assert summary["steps"] == 40 // 8


def test_models_are_built_from_the_config(tmp_path):
    """One short run with the registry models the config names (B-cos ResNet-20s)."""
    cfg = config_from_dict(_config(tmp_path, data={"batch_size": 16}, train={"epochs": 1}))
    trainer = Trainer(cfg, ShapesSet(16, seed=0), None, show_progress=False)
    assert trainer.student.e2kd_name == "bcos_resnet20_cifar" and not trainer.teacher.training
    assert trainer.fit()["steps"] == 1


def test_too_little_data_is_a_clear_error(tmp_path):
    with pytest.raises(TrainingError, match="fewer than one optimiser step needs"):
        _trainer(tmp_path, n_train=6)
    assert _trainer(tmp_path, n_train=6, data={"drop_last": False}).steps_per_epoch == 1  # the partial step counts


def test_drop_last_false_trains_the_partial_last_step_as_the_mean_over_its_images(tmp_path):
    """data.drop_last false (the official loader): 20 images at batch 8 make steps of 8, 8 and 4 images."""
    dropped = _trainer(tmp_path / "dropped", n_train=20, train={"epochs": 1})
    assert dropped.fit()["steps"] == 2
    assert [r["images"] for r in read_metrics(tmp_path / "dropped" / "run", "train")] == [8, 8]
    runs = {}
    # The same 8, 8, 4 epoch positions per step, as one micro-batch or as two of 4 (the last: 4 images and none).
    # Without batch norm, whose batch statistics would differ between micro-batches of 4 and of 8.
    for name, batch, accum in (("whole", 8, 1), ("split", 4, 2)):
        cfg = config_from_dict(
            _config(
                tmp_path / name,
                data={"batch_size": batch, "drop_last": False},
                train={"epochs": 1, "grad_accum": accum},
            )
        )
        student, teacher = (_tiny_bcos_without_norms(seed) for seed in (2, 1))
        trainer = Trainer(cfg, ShapesSet(20, seed=0), None, student=student, teacher=teacher, show_progress=False)
        assert trainer.steps_per_epoch == 3 and trainer.fit()["steps"] == 3
        runs[name] = (trainer, read_metrics(tmp_path / name / "run", "train"))
    (whole, whole_log), (split, split_log) = runs["whole"], runs["split"]
    assert [r["images"] for r in whole_log] == [r["images"] for r in split_log] == [8, 8, 4]
    for a, b in zip(whole_log, split_log, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5
    for a, b in zip(whole.student.state_dict().values(), split.student.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_epoch_sampler_is_deterministic_and_resumable():
    sampler = EpochSampler(torch.arange(10), seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start=4)
    assert list(sampler) == full[4:]
    sampler.set_epoch(3)
    assert [i for i, _ in sampler] != [i for i, _ in full]
    assert sorted(i for i, _ in full) == list(range(10))


class FrozenShapesSet(ShapesSet):
    """ShapesSet with stored teacher outputs, flipped together with the image (a paired transform)."""

    def __init__(self, n: int, seed: int, teacher: torch.nn.Module) -> None:
        super().__init__(n, seed)
        from e2kd_fast.explain import dynamic_weights

        self.maps, self.logits = dynamic_weights(teacher, self.images, None, return_logits=True, create_graph=False)
        self.logits = self.logits.detach()

    def __getitem__(self, i: int):
        image, teacher_map = self.images[i], self.maps[i]
        if torch.rand(()) < 0.5:
            image, teacher_map = image.flip(-1), teacher_map.flip(-1)
        return {
            "image": image,
            "target": int(self.targets[i]),
            "index": i,
            "teacher_logits": self.logits[i],
            "teacher_map": teacher_map,
        }


def test_frozen_teacher_training_resumes_exactly(tmp_path):
    teacher = _tiny_bcos(1).eval()
    sections = {"teacher": {"mode": "frozen", "store": "unused"}, "train": {"epochs": 2, "checkpoint_every_steps": 3}}

    def make(run):
        cfg = config_from_dict(_config(tmp_path / run, **sections))
        train_set = FrozenShapesSet(40, 0, teacher)
        return Trainer(cfg, train_set, None, student=_tiny_bcos(2), teacher=None, show_progress=False)

    make("a").fit()
    reference = _train_losses(tmp_path / "a" / "run")
    _fit_until_interrupted(make("b"), 4)
    make("b").fit(resume="auto")
    resumed = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "b" / "run", "train")}
    assert [resumed[s] for s in range(4, 11)] == reference[3:]


def test_channels_last_training_matches_contiguous(tmp_path):
    """train.channels_last changes the memory format, not the result (bf16 autocast is CUDA-only)."""
    plain = _trainer(tmp_path / "a", train={"epochs": 1})
    plain.fit()
    nhwc = _trainer(tmp_path / "b", train={"epochs": 1, "channels_last": True})
    nhwc.fit()
    a, b = _train_losses(tmp_path / "a" / "run"), _train_losses(tmp_path / "b" / "run")
    assert a == pytest.approx(b, rel=1e-4)
