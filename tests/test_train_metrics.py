"""Training accuracy and validation loss in metrics.jsonl, checked against independent computations."""

from __future__ import annotations

import pytest
import torch

from e2kd_fast.config import config_from_dict
from e2kd_fast.distill import e2kd_objective
from e2kd_fast.engine import Trainer, read_metrics
from e2kd_fast.engine.evaluate import ValidationLoss
from e2kd_fast.reference.losses import uniform_off_label_bce
from tests.helpers import set_rank_environment
from tests.test_trainer import ShapesSet, _config, _fit_until_interrupted, _tiny_bcos, _tiny_bcos_without_norms


class FixedShapes(ShapesSet):
    """`ShapesSet` without the random flip: the validation images an independent computation sees too."""

    def __getitem__(self, i: int):
        return {"image": self.images[i], "target": int(self.targets[i]), "index": i}


def _run(tmp_path, method: str, **distill) -> tuple[Trainer, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A one-epoch run that records the student logits and labels of every training micro-batch."""
    cfg = config_from_dict(_config(tmp_path, distill={"method": method, **distill}, train={"epochs": 1}))
    teacher = None if method == "none" else _tiny_bcos(1)
    trainer = Trainer(
        cfg, ShapesSet(40, seed=0), FixedShapes(16, seed=9), student=_tiny_bcos(2), teacher=teacher, show_progress=False
    )
    seen, objective = [], trainer._objective

    def recording(batch):
        out = objective(batch)
        seen.append((out["student_logits"].detach().clone(), out["accuracy_target"].clone()))
        return out

    trainer._objective = recording
    trainer.fit()
    return trainer, seen


@pytest.mark.parametrize("method", ["none", "e2kd"])
def test_epoch_training_accuracy_is_the_top1_of_the_steps_logits(tmp_path, method):
    trainer, seen = _run(tmp_path, method)
    records = read_metrics(tmp_path / "run", "train")
    assert len(records) == trainer.steps_per_epoch == 5
    assert all("epoch_top1" not in r for r in records[:-1])  # only the epoch's last record holds the epoch's value
    logits = torch.cat([s[0] for s in seen])
    target = torch.cat([s[1] for s in seen])
    assert logits.shape[0] == 40
    expected = (logits.argmax(1) == target).float().mean().item()
    assert records[-1]["epoch_top1"] == pytest.approx(expected, abs=1e-12)
    assert records[-1]["epoch_top5"] == 1.0  # 4 classes: k capped at C


def test_validation_loss_is_the_objective_on_the_validation_images(tmp_path):
    trainer, _ = _run(tmp_path, "e2kd", lam=2.0, tau=3.0)
    (record,) = read_metrics(tmp_path / "run", "eval")
    val = FixedShapes(16, seed=9)
    images = torch.stack([val[i]["image"] for i in range(16)])
    labels = torch.tensor([val[i]["target"] for i in range(16)])
    student = trainer.student.eval()
    # The objective of training (the autograd reference), on all 16 validation images at once.
    out = e2kd_objective(student, trainer.teacher, images, tau=3.0, lam=2.0, labels=labels)
    for key in ("loss", "kd", "exp"):
        assert record[key] == pytest.approx(float(out[key].detach()), rel=1e-5, abs=1e-6), key
    with torch.no_grad():
        gt = uniform_off_label_bce(student(images), labels)
    assert record["gt"] == pytest.approx(float(gt), rel=1e-5)


def test_validation_loss_without_a_teacher_is_the_supervised_objective(tmp_path):
    trainer, _ = _run(tmp_path, "none")
    (record,) = read_metrics(tmp_path / "run", "eval")
    val = FixedShapes(16, seed=9)
    images = torch.stack([val[i]["image"] for i in range(16)])
    labels = torch.tensor([val[i]["target"] for i in range(16)])
    with torch.no_grad():
        expected = uniform_off_label_bce(trainer.student.eval()(images), labels)
    assert record["loss"] == record["gt"] == pytest.approx(float(expected), rel=1e-5)
    assert "kd" not in record and "exp" not in record


def test_validation_loss_per_method():
    models = {"student": {"name": "bcos_resnet20_cifar"}, "teacher": {"name": "bcos_resnet20_cifar"}}
    cfg = config_from_dict({**models, "distill": {"method": "kd", "tau": 2.0}})
    kd = ValidationLoss.from_config(cfg, bcos_student=True)
    assert (kd.method, kd.lam, kd.tau) == ("kd", 0.0, 2.0)
    logits, teacher = torch.randn(3, 5), torch.randn(3, 5)
    labels = torch.tensor([0, 1, 2])
    assert kd(logits, labels) is None  # a distillation loss needs the teacher's outputs
    terms = kd(logits, labels, teacher)
    assert set(terms) == {"loss", "kd", "gt"} and torch.equal(terms["loss"], terms["kd"])
    e2kd = ValidationLoss("e2kd", lam=1.0)
    assert e2kd(logits, labels, teacher) is None  # λ > 0 needs both explanations
    baseline = config_from_dict({**models, "distill": {"method": "at"}})
    assert ValidationLoss.from_config(baseline, bcos_student=True) is None


def test_resume_mid_epoch_keeps_the_epochs_training_accuracy(tmp_path):
    full, _ = _run(tmp_path / "a", "none")
    reference = read_metrics(tmp_path / "a" / "run", "train")[-1]
    cfg = config_from_dict(
        _config(tmp_path / "b", distill={"method": "none"}, train={"epochs": 1, "checkpoint_every_steps": 3})
    )

    def make() -> Trainer:
        val = FixedShapes(16, seed=9)
        return Trainer(cfg, ShapesSet(40, seed=0), val, student=_tiny_bcos(2), teacher=None, show_progress=False)

    _fit_until_interrupted(make(), 4)
    make().fit(resume="auto")
    resumed = read_metrics(tmp_path / "b" / "run", "train")[-1]
    assert resumed["epoch_top1"] == reference["epoch_top1"]


def _ddp_config(out_dir) -> dict:
    """2 steps of 8 images (4 per rank under DDP), no batch norm (per-rank statistics would differ)."""
    return {
        "student": {"name": "bcos_resnet20_cifar", "num_classes": 4},
        "teacher": {"name": "bcos_resnet20_cifar", "num_classes": 4},
        "distill": {"method": "e2kd", "lam": 1.0},
        "optim": {"lr": 1e-2, "schedule": "constant"},
        "data": {"batch_size": 8, "num_workers": 0},
        "train": {"epochs": 1, "out_dir": str(out_dir), "log_every_steps": 1, "device": "cpu", "compile": False},
        "engine": {"strategy": "ddp" if "ddp" in str(out_dir) else "single"},
    }


def _fit_ddp_config(out_dir) -> None:
    student, teacher = _tiny_bcos_without_norms(2), _tiny_bcos_without_norms(1)
    cfg = config_from_dict(_ddp_config(out_dir))
    Trainer(
        cfg, ShapesSet(16, seed=0), FixedShapes(6, seed=9), student=student, teacher=teacher, show_progress=False
    ).fit()


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    set_rank_environment(rank, 2, port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    _fit_ddp_config(out_dir)
    dist.destroy_process_group()


def test_two_ddp_ranks_log_the_accuracy_and_validation_loss_of_one_process(tmp_path, monkeypatch):
    """The hits of both ranks are summed (in the step's all-reduce): 2 ranks × 4 images = 1 process × 8."""
    import torch.multiprocessing as mp

    from e2kd_fast.engine.process_group import find_free_port

    monkeypatch.setenv("E2KD_BACKEND", "reference")
    _fit_ddp_config(tmp_path / "single")
    mp.spawn(_ddp_worker, args=(find_free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    single, ddp = (read_metrics(tmp_path / name) for name in ("single", "ddp"))
    (single_train, ddp_train) = ([r for r in log if r["kind"] == "train"][-1] for log in (single, ddp))
    assert ddp_train["images"] == single_train["images"] == 8
    assert ddp_train["epoch_top1"] == single_train["epoch_top1"]
    assert ddp_train["epoch_top5"] == single_train["epoch_top5"]
    (single_eval, ddp_eval) = ([r for r in log if r["kind"] == "eval"][0] for log in (single, ddp))
    assert ddp_eval["loss"] == pytest.approx(single_eval["loss"], rel=1e-5)
