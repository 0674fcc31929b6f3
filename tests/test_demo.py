"""`make demo` end to end at a tiny size: it trains, checkpoints, explains and writes its outputs."""

from __future__ import annotations

import json

import torch

from e2kd_fast.data import SHAPE_CLASSES, shapes_dataset
from e2kd_fast.demo import run_demo


def test_shapes_dataset_is_deterministic_and_masked():
    images, labels, masks = shapes_dataset(16, size=32, seed=3)
    again = shapes_dataset(16, size=32, seed=3)
    assert torch.equal(images, again[0]) and torch.equal(labels, again[1])
    assert images.shape == (16, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    assert set(labels.tolist()) == set(range(len(SHAPE_CLASSES)))
    assert masks.any(dim=(1, 2)).all()


def test_demo_runs_and_writes_its_outputs(tmp_path):
    summary = run_demo(tmp_path, steps=3, batch_size=16)
    assert (tmp_path / "model.pt").is_file() and (tmp_path / "explanations.png").is_file()
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["max_abs_logit_reconstruction_error"] < 1e-3  # dynamic linearity in float32
    assert 0 <= summary["positive_evidence_on_object"] <= 1
