"""The Waterbirds-like generator: correlations per split, separable cues, layout on disk, idempotence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from e2kd_fast.data import (
    WATERBIRDS_CLASSES,
    WATERBIRDS_PLACES,
    ImageFolderDataset,
    generate_waterbirds_like,
    make_waterbirds_like_split,
    waterbirds_places,
)
from e2kd_fast.data.waterbirds_synthetic import _BIRD_COLOURS, _PLACE_COLOURS

SMALL = {"train_biased": 12, "train_unbiased": 9, "val": 6, "test_id": 6, "test_ood": 9}


@pytest.mark.parametrize("num_classes", [2, 4])
def test_places_follow_the_split_rule(num_classes):
    k = num_classes
    biased = make_waterbirds_like_split(2000, "train_biased", num_classes=k, image_size=16, bias=0.9)
    agree = (biased["places"] == biased["targets"]).float().mean().item()
    assert abs(agree - 0.9) < 0.03
    assert torch.equal(torch.bincount(biased["targets"], minlength=k), torch.full((k,), 2000 // k))
    minority = biased["places"][biased["places"] != biased["targets"]]
    assert len(set(minority.tolist())) == k  # the minority places cover all places
    unbiased = make_waterbirds_like_split(2000, "train_unbiased", num_classes=k, image_size=16)
    assert abs((unbiased["places"] == unbiased["targets"]).float().mean().item() - 1 / k) < 0.04
    ood = make_waterbirds_like_split(200, "test_ood", num_classes=k, image_size=16)
    assert torch.equal(ood["places"], (ood["targets"] + 1) % k)
    for split in ("val", "test_id"):
        d = make_waterbirds_like_split(400, split, num_classes=k, image_size=16, bias=0.95)
        assert (d["places"] == d["targets"]).float().mean() > 0.9


def test_foreground_and_background_cues_are_separable_and_masked():
    d = make_waterbirds_like_split(400, "train_unbiased", num_classes=4, image_size=32, seed=3)
    images, masks = d["images"], d["masks"]
    assert images.shape == (400, 3, 32, 32) and masks.shape == (400, 32, 32) and masks.dtype == torch.bool
    assert 0 <= images.min() and images.max() <= 1
    assert torch.equal(images, (images * 255).round() / 255)  # 8-bit exact, as written to PNG
    fraction = masks.float().mean((1, 2))
    assert fraction.min() > 0.07 and fraction.max() < 0.28
    m = masks[:, None].float()
    fg_mean = (images * m).sum((2, 3)) / m.sum((2, 3))  # [N, 3]
    bg_mean = (images * (1 - m)).sum((2, 3)) / (1 - m).sum((2, 3))
    bird, place = torch.tensor(_BIRD_COLOURS), torch.tensor(_PLACE_COLOURS)
    # Nearest of all 8 colour families: the bird's mean colour names its class (and is never taken for a
    # place), the background's names its place (and is never taken for a bird).
    families = torch.cat([bird, place])
    assert torch.equal(torch.cdist(fg_mean, families).argmin(1), d["targets"])
    assert torch.equal(torch.cdist(bg_mean, families).argmin(1), d["places"] + 4)
    assert torch.cdist(fg_mean, bg_mean).min() > 0.2


def test_generation_is_deterministic_per_seed():
    a = make_waterbirds_like_split(16, "test_ood", num_classes=3, seed=5)
    b = make_waterbirds_like_split(16, "test_ood", num_classes=3, seed=5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = make_waterbirds_like_split(16, "test_ood", num_classes=3, seed=6)
    assert not torch.equal(a["images"], c["images"])
    d = make_waterbirds_like_split(16, "test_id", num_classes=3, seed=5)
    assert not torch.equal(a["images"], d["images"])  # each split draws its own images


def test_bad_parameters_are_refused(tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        make_waterbirds_like_split(8, num_classes=5)
    with pytest.raises(ValueError, match="unknown split"):
        make_waterbirds_like_split(8, "test")
    with pytest.raises(ValueError, match="unknown splits"):
        generate_waterbirds_like(tmp_path / "x", per_split={"train": 8})
    with pytest.raises(ValueError, match="at least one image per class"):
        generate_waterbirds_like(tmp_path / "x", num_classes=3, per_split={"val": 2})
    assert not (tmp_path / "x").exists()


def test_written_layout_matches_the_generator(tmp_path):
    root = tmp_path / "wb"
    info = generate_waterbirds_like(root, num_classes=3, image_size=16, per_split=SMALL, seed=1)
    classes = list(WATERBIRDS_CLASSES[:3])
    assert info == json.loads((root / "info.json").read_text())
    assert info["classes"] == classes and info["places"] == list(WATERBIRDS_PLACES[:3])
    assert info["params"]["per_split"] == SMALL and info["params"]["bias"] == 0.95
    assert {s: sum(c.values()) for s, c in info["counts"].items()} == SMALL
    assert sorted(p.name for p in root.iterdir()) == sorted([*SMALL, "masks", "info.json", "metadata.csv"])
    assert not list(tmp_path.glob(".wb.tmp-*"))  # the temporary folder is gone

    for split, n in SMALL.items():
        ref = make_waterbirds_like_split(n, split, num_classes=3, image_size=16, seed=1)
        ds = ImageFolderDataset(root, split, masks_root=root / "masks")
        assert ds.classes == sorted(classes) and len(ds) == n
        order = [int(p.stem) for p, _ in ds.samples]  # file name k = index in the generated split
        names = [ds.classes[t] for t in ds.targets.tolist()]
        assert names == [classes[t] for t in ref["targets"][order].tolist()]
        batch = [ds[i] for i in range(n)]
        assert torch.equal(torch.stack([b["image"] for b in batch]), ref["images"][order])  # lossless PNG
        assert torch.equal(torch.stack([b["mask"] for b in batch]), ref["masks"][order])
        assert torch.equal(waterbirds_places(ds), ref["places"][order])
    path = root / "train_biased" / classes[0]
    first = sorted(path.iterdir())[0]
    assert Image.open(first).mode == "RGB" and Image.open(root / "masks" / first.relative_to(root)).mode == "L"
    mask_values = np.unique(np.asarray(Image.open(root / "masks" / first.relative_to(root))))
    assert set(mask_values.tolist()) <= {0, 255}


def test_rerun_is_a_noop_and_mismatches_are_errors(tmp_path):
    root = tmp_path / "wb"
    params = dict(num_classes=2, image_size=16, per_split=SMALL, seed=0)
    info = generate_waterbirds_like(root, **params)
    stamp = (root / "info.json").stat().st_mtime_ns, (root / "val/landbird").stat().st_mtime_ns
    assert generate_waterbirds_like(root, **params) == info
    assert ((root / "info.json").stat().st_mtime_ns, (root / "val/landbird").stat().st_mtime_ns) == stamp

    with pytest.raises(ValueError, match="other parameters"):
        generate_waterbirds_like(root, **{**params, "seed": 1})
    with pytest.raises(ValueError, match="other parameters"):
        generate_waterbirds_like(root, **{**params, "per_split": {**SMALL, "val": 8}})
    next(iter((root / "test_ood/waterbird").iterdir())).unlink()
    with pytest.raises(ValueError, match="incomplete or modified"):
        generate_waterbirds_like(root, **params)

    other = tmp_path / "other"
    (other / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="no info.json"):
        generate_waterbirds_like(other, **params)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert generate_waterbirds_like(empty, **params)["counts"] == info["counts"]  # an empty folder is fine
