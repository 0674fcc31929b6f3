"""ImageNet-style folders: deterministic order, clear layout errors, unreadable files skipped and counted."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF

from e2kd_fast.data import ImageFolderDataset, collate_skipping, paired_eval_transform, train_transform
from e2kd_fast.data.folders import UnsupportedImageError, read_image
from tests.helpers import pixel_format_cases


def _save(path, seed: int, size=(12, 10), fmt=None) -> torch.Tensor:
    """Writes a random RGB image (H, W = size) and returns it as uint8 [3, H, W]."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (*size, 3), generator=g, dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.numpy()).save(path, format=fmt)
    return pixels.permute(2, 0, 1)


def _truncated_jpeg(path) -> None:
    buf = io.BytesIO()
    g = torch.Generator().manual_seed(9)
    Image.fromarray(torch.randint(0, 256, (64, 64, 3), generator=g, dtype=torch.uint8).numpy()).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


@pytest.fixture
def tree(tmp_path):
    """train/: b_dog (2 PNG + 1 JPEG with upper-case .JPEG), a_cat (2 PNG), plus non-images and a hidden dir."""
    root = tmp_path / "data"
    pixels = {}
    pixels["b_dog/z.png"] = _save(root / "train/b_dog/z.png", 1)
    pixels["b_dog/a.png"] = _save(root / "train/b_dog/a.png", 2)
    _save(root / "train/b_dog/m.JPEG", 3, fmt="JPEG")
    pixels["a_cat/x.PNG"] = _save(root / "train/a_cat/x.PNG", 4)
    pixels["a_cat/c.png"] = _save(root / "train/a_cat/c.png", 5)
    (root / "train/a_cat/readme.txt").write_text("not an image")
    (root / "train/.ipynb_checkpoints").mkdir()
    return root, pixels


def test_classes_samples_targets_are_sorted_and_deterministic(tree):
    root, _ = tree
    ds = ImageFolderDataset(root, "train")
    assert ds.classes == ["a_cat", "b_dog"]
    names = [(p.parent.name, p.name, t) for p, t in ds.samples]
    assert names == [
        ("a_cat", "c.png", 0),
        ("a_cat", "x.PNG", 0),
        ("b_dog", "a.png", 1),
        ("b_dog", "m.JPEG", 1),
        ("b_dog", "z.png", 1),
    ]
    assert torch.equal(ds.targets, torch.tensor([0, 0, 1, 1, 1])) and ds.targets.dtype == torch.long
    assert ImageFolderDataset(root, "train").samples == ds.samples
    assert len(ImageFolderDataset(root, "train", extensions=("png",))) == 4


def test_items_without_and_with_transform(tree):
    root, pixels = tree
    ds = ImageFolderDataset(root, "train")
    item = ds[0]
    assert set(item) == {"image", "target", "index"} and item["target"] == 0 and item["index"] == 0
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 12, 10)
    torch.testing.assert_close(item["image"], pixels["a_cat/c.png"].float() / 255)  # PNG is lossless
    assert ds[-1]["index"] == 4
    ds = ImageFolderDataset(root, "train", transform=train_transform(8, encoding="bcos"))
    assert ds[3]["image"].shape == (6, 8, 8)


def test_layout_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "val")):
        ImageFolderDataset(tmp_path, "val")
    (tmp_path / "val").mkdir()
    with pytest.raises(ValueError, match="no class folders in .*val"):
        ImageFolderDataset(tmp_path, "val")
    _save(tmp_path / "val/cat/1.png", 0)
    (tmp_path / "val/dog").mkdir()
    (tmp_path / "val/dog/notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"class folder .*val/dog has no images"):
        ImageFolderDataset(tmp_path, "val")


def test_unreadable_images_warn_and_are_skipped_in_batches(tree):
    root, _ = tree
    bad = root / "train/a_cat/bad.JPEG"
    bad.write_bytes(torch.randint(0, 256, (500,), dtype=torch.uint8).numpy().tobytes())
    _truncated_jpeg(root / "train/b_dog/trunc.jpg")
    ds = ImageFolderDataset(root, "train", transform=train_transform(8, encoding="none"))
    assert len(ds) == 7
    bad_idx = [i for i, (p, _) in enumerate(ds.samples) if p.name in ("bad.JPEG", "trunc.jpg")]
    for i in bad_idx:
        with pytest.warns(UserWarning, match=ds.samples[i][0].name) as record:
            assert ds[i] is None
        assert str(ds.samples[i][0]) in str(record[0].message)  # the full path, to find and fix the file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(DataLoader(ds, batch_size=4, collate_fn=collate_skipping))
    assert sum(b["skipped"] for b in batches) == 2
    assert sum(len(b["target"]) for b in batches) == 5
    for b in batches:
        assert b["image"].shape == (len(b["target"]), 3, 8, 8)
        assert b["target"].dtype == b["index"].dtype == torch.long
    seen = torch.cat([b["index"] for b in batches]).tolist()
    assert sorted(seen) == sorted(set(range(7)) - set(bad_idx))
    assert torch.equal(torch.cat([b["target"] for b in batches]), ds.targets[seen])


def test_collate_of_an_all_unreadable_batch_is_empty():
    b = collate_skipping([None, None, None])
    assert b["skipped"] == 3 and b["image"].numel() == 0
    assert b["target"].shape == (0,) and b["target"].dtype == torch.long and b["index"].dtype == torch.long


def test_loader_with_a_worker_process_counts_skips(tree):
    root, _ = tree
    (root / "train/b_dog/bad.jpeg").write_bytes(b"\x00" * 100)
    ds = ImageFolderDataset(root, "train", transform=train_transform(8, encoding="bcos"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(DataLoader(ds, batch_size=3, num_workers=1, collate_fn=collate_skipping))
    assert sum(b["skipped"] for b in batches) == 1 and sum(len(b["index"]) for b in batches) == 5


def test_masks_follow_the_image_geometry(tree, tmp_path):
    root, _ = tree
    masks = tmp_path / "masks"
    ds = ImageFolderDataset(root, "train")
    for path, target in ds.samples:
        m = torch.zeros(24, 20, dtype=torch.uint8)  # masks at twice the image resolution
        m[:, :10] = 255  # left half
        out = masks / "train" / ds.classes[target] / f"{path.stem}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(m.numpy()).save(out)
    plain = ImageFolderDataset(root, "train", masks_root=masks)
    item = plain[1]
    assert item["mask"].dtype == torch.bool and item["mask"].shape == (24, 20) and item["mask"][:, :10].all()
    paired = ImageFolderDataset(root, "train", transform=paired_eval_transform(8, 8, encoding="bcos"), masks_root=masks)
    item = paired[2]
    assert item["image"].shape == (6, 8, 8) and item["mask"].shape == (8, 8)
    assert item["mask"][:, :4].all() and not item["mask"][:, 4:].any()
    batch = collate_skipping([paired[0], None, paired[2]])
    assert batch["mask"].shape == (2, 8, 8) and batch["mask"].dtype == torch.bool and batch["skipped"] == 1

    (masks / "train/b_dog/z.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 of 5 masks are missing.*b_dog/z.png"):
        ImageFolderDataset(root, "train", masks_root=masks)
    with pytest.raises(FileNotFoundError, match="mask split folder"):
        ImageFolderDataset(root, "train", masks_root=tmp_path / "nowhere")


def test_split_class_folders_must_match_the_given_classes(tree):
    root, pixels = tree
    train = ImageFolderDataset(root, "train")
    _save(root / "val/b_dog/1.png", 6)  # a_cat has no val folder: b_dog must keep class id 1, not become 0
    with pytest.raises(ValueError, match=r"val.* do not match .*missing: a_cat; extra: none"):
        ImageFolderDataset(root, "val", classes=train.classes)
    _save(root / "val/a_cat/1.png", 7)
    _save(root / "val/aardvark/1.png", 8)
    with pytest.raises(ValueError, match=r"missing: none; extra: aardvark"):
        ImageFolderDataset(root, "val", classes=train.classes)
    (root / "val/aardvark/1.png").unlink()
    (root / "val/aardvark").rmdir()
    val = ImageFolderDataset(root, "val", classes=train.classes)
    assert val.classes == train.classes and [(p.parent.name, t) for p, t in val.samples] == [("a_cat", 0), ("b_dog", 1)]
    # The given order is the class map, whatever the folders' sorted order.
    swapped = ImageFolderDataset(root, "val", classes=["b_dog", "a_cat"])
    assert [(p.parent.name, t) for p, t in swapped.samples] == [("b_dog", 0), ("a_cat", 1)]


def test_bit_depths_gray_palette_and_alpha_read_as_by_hand(tmp_path):
    cases = pixel_format_cases()
    for name, (data, _) in cases.items():
        (tmp_path / "train" / "c").mkdir(parents=True, exist_ok=True)
        (tmp_path / "train" / "c" / f"{name}.png").write_bytes(data)
    ds = ImageFolderDataset(tmp_path, "train")
    for i, (path, _) in enumerate(ds.samples):
        expected = torch.from_numpy(cases[path.stem][1]).permute(2, 0, 1)
        torch.testing.assert_close(ds[i]["image"], expected.float() / 255, rtol=0, atol=0, msg=path.stem)
    # Masks too: a 16-bit mask is read at its scale (a plain conversion clips it to 255: all foreground).
    gray = torch.from_numpy(cases["gray16"][1][..., 0])
    assert torch.equal(TF.pil_to_tensor(read_image(tmp_path / "train/c/gray16.png", "L"))[0], gray)


def test_images_of_other_pixel_formats_are_refused_by_name(tmp_path):
    path = tmp_path / "train" / "c" / "float.tif"
    path.parent.mkdir(parents=True)
    Image.fromarray(torch.rand(6, 5).numpy()).save(path)  # 32-bit float: no defined 8-bit values
    with pytest.raises(UnsupportedImageError, match=rf"{path}: pixel format 'F'"):
        read_image(path)
    ds = ImageFolderDataset(tmp_path, "train", extensions=(".tif",))
    with pytest.warns(UserWarning, match=rf"skipping unreadable image file {path}: .*pixel format 'F'"):
        assert ds[0] is None


@pytest.mark.parametrize("fmt", ["bmp", "ppm", "tif", "webp"])
def test_every_extension_torchvision_takes_is_listed_and_read(tmp_path, fmt):
    options = {"lossless": True} if fmt == "webp" else {}
    pixels = torch.randint(0, 256, (10, 12, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    (tmp_path / "train" / "c").mkdir(parents=True)
    Image.fromarray(pixels.numpy()).save(tmp_path / "train" / "c" / f"a.{fmt}", **options)
    ds = ImageFolderDataset(tmp_path, "train")
    assert [p.name for p, _ in ds.samples] == [f"a.{fmt}"]
    torch.testing.assert_close(ds[0]["image"], pixels.permute(2, 0, 1).float() / 255, rtol=0, atol=0)
