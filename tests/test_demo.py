"""`make demo` end to end at tiny sizes: data, teacher, KD and e²KD students, report and metrics."""

from __future__ import annotations

import json

import torch

from e2kd_fast.cli import main
from e2kd_fast.data import SHAPE_CLASSES, shapes_dataset


def test_shapes_dataset_is_deterministic_and_masked():
    images, labels, masks = shapes_dataset(16, size=32, seed=3)
    again = shapes_dataset(16, size=32, seed=3)
    assert torch.equal(images, again[0]) and torch.equal(labels, again[1])
    assert images.shape == (16, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    assert set(labels.tolist()) == set(range(len(SHAPE_CLASSES)))
    assert masks.any(dim=(1, 2)).all()


def test_demo_writes_report_and_metrics(tmp_path, capsys):
    """The quick demo through the command line (`e2kd-fast demo --quick`)."""
    assert main(["demo", "--out", str(tmp_path), "--quick", "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {"teacher", "kd", "e2kd"}
    for values in metrics.values():
        assert set(values) == {"id_acc", "ood_acc", "agreement", "explanation_similarity", "epg"}
        assert all(0 <= v <= 1 for k, v in values.items() if k != "explanation_similarity")
    assert metrics["teacher"]["agreement"] == 1.0
    report = (tmp_path / "report.md").read_text()
    assert "| kd |" in report and "| e2kd |" in report
    assert (tmp_path / "explanations_ood.png").is_file()
    assert (tmp_path / "e2kd" / "metrics.jsonl").is_file()
