"""DALI input pipelines with CPU operators: sharding, resume, corrupt files, paired crops of image and map."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from e2kd_fast.data import ImageFolderDataset, eval_transform, resized_crop_relative
from e2kd_fast.data.frozen_store import FrozenStore, StoreMismatchError, read_fingerprinted
from e2kd_fast.data.sampling import EpochSampler
from tests.helpers import pixel_format_cases, write_image_folder

pytest.importorskip("nvidia.dali")

from e2kd_fast.data import dali  # noqa: E402
from e2kd_fast.data.dali import DaliLoader, Geometry, epoch_plan  # noqa: E402


def _png_folder(root, classes=2, count=4, size=(20, 28), seed=0):
    """Smooth RGB PNGs (lossless: DALI and PIL decode them to the same pixels)."""
    rng = np.random.default_rng(seed)
    for k in range(classes):
        folder = root / "train" / f"class_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            small = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8))
            small.resize(size[::-1], Image.BICUBIC).save(folder / f"{i}.png")
    return ImageFolderDataset(root, "train", transform=None)


def _epoch(loader: DaliLoader) -> list[dict]:
    return list(loader)


def test_epoch_plan_is_the_epoch_sampler_order_sharded():
    indices = torch.arange(3, 16)
    sampler = EpochSampler(indices, seed=5, shuffle=True)
    sampler.set_epoch(2)
    expected = list(sampler)
    flat = [p for b in epoch_plan(indices, batch_size=4, seed=5, epoch=2, shuffle=True) for p in b]
    assert flat == expected
    # Two ranks, evaluation: disjoint, union = everything, batch counts differ by at most one.
    ranks = [epoch_plan(indices, batch_size=4, seed=5, epoch=2, shuffle=True, rank=r, world_size=2) for r in (0, 1)]
    got = [p for plan in ranks for b in plan for p in b]
    assert sorted(got) == sorted(expected) and len(got) == len(expected)
    # Training (drop_last): equal batch counts, every batch full, global batch j = positions [8j, 8j + 8).
    train = [
        epoch_plan(indices, batch_size=4, seed=5, epoch=2, shuffle=True, rank=r, world_size=2, drop_last=True)
        for r in (0, 1)
    ]
    assert [len(p) for p in train] == [1, 1] and all(len(b) == 4 for p in train for b in p)
    assert sorted(train[0][0] + train[1][0]) == sorted(expected[:8])
    # Resuming at a global position continues the same sequence.
    tail = epoch_plan(indices, batch_size=4, seed=5, epoch=2, shuffle=True, start=8, rank=1, world_size=2)
    assert [p for b in tail for p in b] == expected[9::2]


def test_two_shards_cover_the_dataset_once_through_dali(tmp_path):
    root = write_image_folder(tmp_path / "d", classes=3, per_split={"train": 3}, size=(24, 30))
    ds = ImageFolderDataset(root, "train")  # 9 images: 5 + 4 over 2 ranks
    seen = []
    for rank in (0, 1):
        loader = DaliLoader(
            ds.samples,
            torch.arange(len(ds)),
            batch_size=2,
            geometry=Geometry(16, train=True),
            seed=3,
            shuffle=True,
            rank=rank,
            world_size=2,
            num_threads=1,
        )
        batches = _epoch(loader)
        assert len(batches) == len(loader) == 3 - rank
        for b in batches:
            assert b["image"].shape[1:] == (6, 16, 16) and b["image"].dtype == torch.float32
            torch.testing.assert_close(b["target"], ds.targets[b["index"]])
            torch.testing.assert_close(b["image"][:, 3:], 1 - b["image"][:, :3])  # [x, 1 − x]
        seen += [i for b in batches for i in b["index"].tolist()]
    assert sorted(seen) == list(range(len(ds)))


def test_eval_matches_torchvision_and_resume_replays_the_epoch(tmp_path):
    ds = _png_folder(tmp_path, size=(20, 28))
    loader = DaliLoader(
        ds.samples, torch.arange(len(ds)), batch_size=3, geometry=Geometry(12, False, resize=14), encoding="standard"
    )
    batches = _epoch(loader)
    assert [b["index"].tolist() for b in batches] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    reference = eval_transform(12, 14, encoding="standard")
    expected = torch.stack([reference(Image.open(p).convert("RGB")) for p, _ in ds.samples])
    got = torch.cat([b["image"] for b in batches])
    # Two resamplers of one geometry (DALI's antialiased linear vs torchvision's): close, not bitwise.
    assert (got - expected).abs().mean() < 0.02 and (got - expected).abs().max() < 0.3

    train = dict(batch_size=3, geometry=Geometry(12, True, (0.3, 1.0)), seed=7, shuffle=True, epoch=1)
    full = _epoch(DaliLoader(ds.samples, torch.arange(len(ds)), **train))
    resumed = _epoch(DaliLoader(ds.samples, torch.arange(len(ds)), start=3, **train))
    assert len(resumed) == len(full) - 1
    for a, b in zip(full[1:], resumed, strict=True):
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)
        assert a["index"].tolist() == b["index"].tolist()
    half = _epoch(DaliLoader(ds.samples, torch.arange(len(ds)), dtype=torch.bfloat16, **train))
    assert half[0]["image"].dtype == torch.bfloat16


def test_corrupt_files_are_skipped_counted_and_named(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "d", classes=2, per_split={"train": 4}, size=(24, 30))
    ds = ImageFolderDataset(root, "train")
    truncated, garbage = ds.samples[1][0], ds.samples[6][0]
    truncated.write_bytes(truncated.read_bytes()[:300])  # header intact, data cut: fails in the decoder
    garbage.write_bytes(b"not an image at all")  # fails at the header
    loader = DaliLoader(ds.samples, torch.arange(len(ds)), batch_size=4, geometry=Geometry(16, False, resize=16))
    with pytest.warns(UserWarning, match="skipping unreadable image file") as record:
        batches = _epoch(loader)
    assert sum(b["skipped"] for b in batches) == 2
    assert sorted(i for b in batches for i in b["index"].tolist()) == [0, 2, 3, 4, 5, 7]
    assert set(loader.skipped_files) == {truncated, garbage}
    named = [str(w.message) for w in record if "skipping unreadable image file" in str(w.message)]
    assert len(named) == 2 and any(str(truncated) in m for m in named) and any(str(garbage) in m for m in named)

    # Past NAMED_SKIPS files, one warning gives the count instead of a line per file.
    monkeypatch.setattr(dali, "NAMED_SKIPS", 1)
    loader = DaliLoader(ds.samples, torch.arange(len(ds)), batch_size=4, geometry=Geometry(16, False, resize=16))
    with pytest.warns(UserWarning) as record:
        _epoch(loader)
    messages = [str(w.message) for w in record]
    assert sum("skipping unreadable image file" in m for m in messages) == 1
    assert any("2 unreadable image files were skipped in all" in m for m in messages)


def test_pixel_formats_read_as_on_the_pil_path_or_are_skipped_by_name(tmp_path):
    cases = pixel_format_cases(size=(8, 8))
    folder = tmp_path / "train" / "c"
    folder.mkdir(parents=True)
    for name, (data, _) in cases.items():
        (folder / f"{name}.png").write_bytes(data)
    Image.fromarray(np.zeros((8, 8), np.float32)).save(folder / "zz_float.png.tif")  # refused by read_image
    ds = ImageFolderDataset(tmp_path, "train", extensions=(".png", ".tif"))
    loader = DaliLoader(
        ds.samples, torch.arange(len(ds)), batch_size=len(ds), geometry=Geometry(8, False, resize=8), encoding="none"
    )
    with pytest.warns(UserWarning, match=r"zz_float.png.tif: UnsupportedImageError: .*pixel format 'F'"):
        (batch,) = _epoch(loader)
    assert batch["skipped"] == 1 and batch["index"].tolist() == list(range(len(cases)))
    for row, index in enumerate(batch["index"].tolist()):
        path = ds.samples[index][0]
        expected = torch.from_numpy(cases[path.stem][1]).permute(2, 0, 1).float() / 255
        torch.testing.assert_close(batch["image"][row], expected, rtol=0, atol=1e-6, msg=path.stem)


def _store_of(ds, tmp_path, maps: torch.Tensor, map_dtype="fp32", map_scale=1) -> FrozenStore:
    store = FrozenStore.create(
        tmp_path / f"store_{map_dtype}_{map_scale}",
        {"num_images": len(ds)},
        num_classes=2,
        map_shape=tuple(maps.shape[1:]),
        map_dtype=map_dtype,
        map_scale=map_scale,
        shard_size=3,
    )
    for k in range(store.num_shards):
        lo, hi = store.shard_range(k)
        store.write_shard(k, torch.arange(lo, hi).float()[:, None].repeat(1, 2), maps[lo:hi])
    return store


def test_a_store_image_changed_or_unreadable_at_precompute_is_refused_or_skipped(tmp_path):
    ds = _png_folder(tmp_path, size=(12, 12))
    files = np.stack([read_fingerprinted(p)[1] for p, _ in ds.samples])
    files[2, 3] = 0  # image 2 was unreadable when the store was computed: zero outputs
    store = FrozenStore.create(tmp_path / "s", {"num_images": len(ds)}, num_classes=2, map_shape=(6, 12, 12))
    store.write_shard(0, torch.ones(len(ds), 2), torch.ones(len(ds), 6, 12, 12), files)
    geometry = Geometry(8, True, (0.5, 1.0))
    loader = DaliLoader(ds.samples, torch.arange(len(ds)), batch_size=4, geometry=geometry, store=store)
    with pytest.warns(UserWarning, match=rf"{ds.samples[2][0]}: it was unreadable when .* was computed"):
        batches = _epoch(loader)
    assert sorted(i for b in batches for i in b["index"].tolist()) == [0, 1, 3, 4, 5, 6, 7]

    changed = ds.samples[5][0]
    Image.new("RGB", (12, 12), (9, 9, 9)).save(changed)
    readable = torch.tensor([0, 1, 3, 4, 5, 6, 7])
    loader = DaliLoader(ds.samples, readable, batch_size=4, geometry=geometry, store=store)
    with pytest.raises(StoreMismatchError, match=rf"{changed} changed since .*they are stale"):
        _epoch(loader)


def test_stored_map_gets_the_image_crop_and_flip(tmp_path):
    ds = _png_folder(tmp_path, size=(20, 28))
    # The "explanation" of each image is the image itself: after the pipeline both must be equal.
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))) for p, _ in ds.samples])
    store = _store_of(ds, tmp_path, pixels.permute(0, 3, 1, 2).float())
    loader = DaliLoader(
        ds.samples,
        torch.arange(len(ds)),
        batch_size=4,
        geometry=Geometry(10, True, (0.2, 0.6)),
        encoding="none",
        seed=11,
        shuffle=True,
        store=store,
    )
    for batch in loader:
        torch.testing.assert_close(batch["teacher_map"], batch["image"] * 255, rtol=0, atol=2e-3)
        torch.testing.assert_close(batch["teacher_logits"][:, 0], batch["index"].float())
    flips = [loader.geometry.roi(20, 28, seed)[2] for b in loader.batches for _, seed in b]
    assert any(flips) and not all(flips)  # the check saw flipped and unflipped crops


@pytest.mark.parametrize("map_dtype,map_scale", [("bf16", 1), ("int8", 2)])
def test_stored_options_are_decoded_and_upsampled_in_the_pipeline(tmp_path, map_dtype, map_scale):
    ds = _png_folder(tmp_path, size=(16, 16))
    maps = torch.randn(len(ds), 6, 16, 16, generator=torch.Generator().manual_seed(0))
    geometry = Geometry(8, True, (0.3, 1.0))
    outputs = {}
    for option in (map_dtype, "fp32"):  # same crops (same seeds): only the storage differs
        store = _store_of(ds, tmp_path, maps, option, map_scale)
        loader = DaliLoader(
            ds.samples, torch.arange(len(ds)), batch_size=8, geometry=geometry, seed=2, shuffle=True, store=store
        )
        (outputs[option],) = list(loader)
    got, exact = outputs[map_dtype]["teacher_map"], outputs["fp32"]["teacher_map"]
    assert got.shape == (8, 6, 8, 8)
    # bf16 keeps 8 significant bits; int8 one step of max|map| / 127 per sample.
    torch.testing.assert_close(got, exact, rtol=0, atol=0.01 * float(maps.abs().max()))
    assert float((got - exact).abs().max()) > 0  # the stored option, not the fp32 store, was read

    # The fp32 store through DALI and through the torch paired transform agree away from the borders
    # (DALI's ROI resampling also reads the pixels just outside the crop; ours stays inside it).
    for row, (index, seed) in enumerate(loader.batches[0]):
        start, end, flip = geometry.roi(16, 16, seed)
        box = (float(start[0]), float(start[1]), float(end[0] - start[0]), float(end[1] - start[1]))
        stored = torch.from_numpy(store.read(index)[1])
        expected = resized_crop_relative(stored, box, 8)
        expected = expected.flip(-1) if flip else expected
        inner = (slice(None), slice(2, -2), slice(2, -2))
        torch.testing.assert_close(exact[row][inner], expected[inner], rtol=0, atol=0.05 * float(maps.abs().max()))


def test_loader_choice_and_fallback(monkeypatch, capsys):
    assert dali.resolve_loader("torchvision") == "torchvision"
    assert dali.resolve_loader("auto", folder=True) == "dali"
    assert dali.resolve_loader("auto", folder=False) == "torchvision"
    with pytest.raises(ValueError, match="data.loader must be one of"):
        dali.resolve_loader("pillow")
    monkeypatch.setattr(dali, "dali_available", lambda: False)
    monkeypatch.setattr(dali, "_NOTICES", set())
    assert dali.resolve_loader("dali") == "torchvision"
    assert dali.resolve_loader("dali") == "torchvision"
    err = capsys.readouterr().err
    assert err.count("DALI is not installed") == 1 and len(err.strip().splitlines()) == 1


def test_trainer_trains_through_dali(tmp_path, monkeypatch):
    from e2kd_fast.config import config_from_dict
    from e2kd_fast.data.build import build_datasets
    from e2kd_fast.engine import Trainer

    root = write_image_folder(tmp_path / "d", classes=2, per_split={"train": 4, "val": 2}, size=(24, 28))
    cfg = config_from_dict(
        {
            "student": {"name": "bcos_resnet20_cifar", "num_classes": 2},
            "distill": {"method": "none"},
            "data": {
                "root": str(root),
                "image_size": 16,
                "eval_resize": 16,
                "batch_size": 4,
                "num_workers": 1,
                "loader": "dali",
            },
            "train": {"epochs": 1, "out_dir": str(tmp_path / "run"), "device": "cpu", "compile": False},
        }
    )
    built = []
    real = dali.DaliLoader
    monkeypatch.setattr(dali, "DaliLoader", lambda *a, **k: built.append(k["geometry"].train) or real(*a, **k))
    data = build_datasets(cfg)
    summary = Trainer(cfg, data.train, data.val, show_progress=False).fit()
    assert summary["steps"] == 2 and summary["final_eval"]["images"] == 4
    assert built == [True, False]  # the training epoch and the evaluation both ran through DALI
