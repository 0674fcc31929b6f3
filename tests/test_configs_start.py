"""Every config in configs/ loads and starts: one optimiser step of the trainer on tiny images."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2kd_fast.config import load_config
from e2kd_fast.data.build import build_datasets
from e2kd_fast.engine import Trainer
from e2kd_fast.engine.precompute import precompute
from tests.helpers import write_image_folder

CONFIGS = sorted(p for p in (Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    # 4 classes × 3 training images: one held out per class leaves 8, one step at batch 8.
    return write_image_folder(tmp_path_factory.mktemp("data"), classes=4, per_split={"train": 3, "val": 1})


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_starts(path, tiny_folder, tmp_path):
    cfg = load_config(path)
    if cfg.data.dataset in ("voc", "waterbirds"):
        pytest.skip("VOC / Waterbirds layouts: these configs train in tests/test_voc_waterbirds.py")
    overrides = [
        f"data.root={tiny_folder}",
        "data.image_size=32",
        "data.eval_resize=32",
        "data.batch_size=8",
        "data.num_workers=0",
        "train.epochs=1",
        f"train.out_dir={tmp_path / 'run'}",
        "train.device=cpu",
        "train.compile=false",  # compilation is tested once, in test_step.py
        "teacher.checkpoint=null",  # the official teacher files are not shipped; random weights start too
        "student.num_classes=4",
    ]
    if cfg.teacher.name is not None:
        overrides.append("teacher.num_classes=4")
    if cfg.data.val_per_class:
        overrides.append("data.val_per_class=1")
    if cfg.data.shots:
        overrides.append("data.shots=2")
    if cfg.train.bn_group_size:
        overrides.append("train.bn_group_size=2")  # 4 groups, as 4 ranks would normalise the 8 images
    if cfg.teacher.mode == "frozen":
        overrides.append(f"teacher.store={tmp_path / 'store'}")
    cfg = load_config(path, overrides)
    if cfg.teacher.mode == "frozen":
        precompute(cfg, show_progress=False)
    data = build_datasets(cfg)
    trainer = Trainer(cfg, data.train, None, train_indices=data.train_indices, show_progress=False)
    assert trainer.fit()["steps"] == 1
