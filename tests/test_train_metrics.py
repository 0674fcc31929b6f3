"""Training accuracy and validation loss in metrics.jsonl, checked against independent computations."""

from __future__ import annotations

import pytest
import torch

from e2kd_fast.config import config_from_dict
from e2kd_fast.distill import e2kd_objective
from e2kd_fast.engine import Trainer, read_metrics
from e2kd_fast.engine.evaluate import ValidationLoss
from e2kd_fast.reference.losses import uniform_off_label_bce
from tests.test_trainer import ShapesSet, _config, _fit_until_interrupted, _tiny_bcos


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
