"""The sharded frozen-explanation store: storage options, multi-rank and resumable precompute, refusals."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from e2kd_fast.cli import main
from e2kd_fast.config import config_from_dict
from e2kd_fast.data.build import build_datasets
from e2kd_fast.data.folders import ImageFolderDataset
from e2kd_fast.data.frozen_store import (
    FrozenStore,
    StoreMismatchError,
    bytes_per_image,
    decode_maps,
    encode_maps,
    fidelity_report,
)
from e2kd_fast.engine.precompute import precompute
from e2kd_fast.models import create_model, save_checkpoint
from tests.helpers import write_image_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data"), classes=3, per_split={"train": 4}, size=(24, 28))


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return save_checkpoint(create_model("bcos_resnet20_cifar", num_classes=3), tmp_path_factory.mktemp("t") / "t.pt")


def _cfg(folder, store, ckpt, **data):
    return config_from_dict(
        {
            "student": {"name": "bcos_resnet20_cifar", "num_classes": 3},
            "teacher": {
                "name": "bcos_resnet20_cifar",
                "num_classes": 3,
                "mode": "frozen",
                "store": str(store),
                "checkpoint": str(ckpt),
            },
            "distill": {"method": "e2kd"},
            "data": {
                "root": str(folder),
                "image_size": 16,
                "eval_resize": 16,
                "batch_size": 4,
                "num_workers": 0,
                **data,
            },
            "train": {"device": "cpu", "compile": False},
        }
    )


def test_storage_options_round_trip_and_fidelity():
    maps = torch.randn(5, 6, 16, 16, generator=torch.Generator().manual_seed(0))
    maps[1] = 0  # an all-zero map (a skipped image) must survive int8
    for dtype in ("fp32", "fp16", "bf16", "int8"):
        raw, scales = encode_maps(maps, dtype)
        assert raw.dtype == {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16, "int8": np.int8}[dtype]
        back = torch.from_numpy(decode_maps(raw, scales, dtype))
        bound = {"fp32": 0, "fp16": 1e-3, "bf16": 8e-3, "int8": 0.5 / 127}[dtype]
        assert float(((back - maps).abs() / maps.abs().amax((1, 2, 3), keepdim=True).clamp_min(1e-12)).max()) <= bound
    raw, _ = encode_maps(maps, "fp16", map_scale=2)
    assert raw.shape == (5, 6, 8, 8)
    torch.testing.assert_close(
        torch.from_numpy(raw[0, 0, :1, :1]).float(), maps[0, 0, :2, :2].mean().view(1, 1), atol=1e-3, rtol=0
    )

    rows = {(r["map_dtype"], r["map_scale"]): r for r in fidelity_report(maps[[0, 2, 3, 4]], num_classes=1000)}
    assert rows[("fp32", 1)]["cosine_min"] == pytest.approx(1.0)
    assert rows[("fp16", 1)]["cosine_min"] > 0.99999 and rows[("bf16", 1)]["cosine_min"] > 0.9999
    assert rows[("int8", 1)]["cosine_min"] > 0.999
    assert rows[("fp16", 2)]["cosine_mean"] < rows[("int8", 1)]["cosine_mean"]  # noise maps lose most to resolution
    # 224² B-cos maps of ImageNet: 4000 B of logits + 6·224² values.
    assert bytes_per_image(1000, (6, 224, 224), "fp16") == 4000 + 2 * 6 * 224 * 224
    assert bytes_per_image(1000, (6, 224, 224), "int8", 2) == 4000 + 6 * 112 * 112 + 4


def test_precompute_by_two_ranks_equals_one_and_resumes(folder, teacher_ckpt, tmp_path):
    one = _cfg(folder, tmp_path / "one", teacher_ckpt)
    precompute(one, shard_size=5, show_progress=False)
    reference = FrozenStore.open(tmp_path / "one")
    assert reference.complete and reference.num_shards == 3 and reference.maps.shape == (12, 6, 16, 16)

    two = _cfg(folder, tmp_path / "two", teacher_ckpt)
    # Rank 1 first, interrupted after one shard (its shards: 1); then rank 0 with a stale temp file around.
    precompute(two, shard_size=5, show_progress=False, rank=1, world_size=2, max_shards=1)
    store = FrozenStore.open(tmp_path / "two")
    assert store.missing_shards() == [0, 2] and store.completed == 5
    with pytest.raises(StoreMismatchError, match=r"incomplete \(5 of 12 images\)"):
        build_datasets(two)
    (tmp_path / "two" / "shards" / "maps_00002.tmp999.npy").write_bytes(b"killed mid-write")
    precompute(two, shard_size=5, show_progress=False, rank=0, world_size=2, max_shards=1)
    assert FrozenStore.open(tmp_path / "two").missing_shards() == [2]
    precompute(two, shard_size=5, show_progress=False, rank=0, world_size=2)  # resumes: shard 2 only
    store = FrozenStore.open(tmp_path / "two")
    assert store.complete
    np.testing.assert_array_equal(np.array(store.maps), np.array(reference.maps))
    np.testing.assert_array_equal(np.array(store.logits), np.array(reference.logits))
    item = build_datasets(two).train[3]
    assert item["teacher_map"].shape == (6, 16, 16)


def test_mismatched_stores_are_refused(folder, teacher_ckpt, tmp_path):
    cfg = _cfg(folder, tmp_path / "s", teacher_ckpt)
    precompute(cfg, shard_size=8, show_progress=False, map_dtype="int8", map_scale=2)
    store = FrozenStore.open(tmp_path / "s")
    assert store.map_shape == (6, 8, 8) and store.read(0)[1].shape == (6, 8, 8)
    assert build_datasets(cfg).train[0]["teacher_map"].shape == (6, 16, 16)  # upsampled by the crop

    with pytest.raises(StoreMismatchError, match="image_size is 16 in the store, 24 here"):
        build_datasets(_cfg(folder, tmp_path / "s", teacher_ckpt, image_size=24, eval_resize=24))
    other_teacher = save_checkpoint(create_model("bcos_resnet20_cifar", num_classes=3), tmp_path / "other.pt")
    with pytest.raises(StoreMismatchError, match="teacher_checkpoint_sha256"):
        build_datasets(_cfg(folder, tmp_path / "s", other_teacher))
    fewer = write_image_folder(tmp_path / "fewer", classes=3, per_split={"train": 3}, size=(24, 28))
    with pytest.raises(StoreMismatchError, match="num_images is 12 in the store, 9 here"):
        build_datasets(_cfg(fewer, tmp_path / "s", teacher_ckpt))
    reordered = write_image_folder(tmp_path / "re", classes=3, per_split={"train": 4}, size=(24, 28))
    (reordered / "train" / "class_2" / "3.jpg").rename(reordered / "train" / "class_2" / "00.jpg")
    with pytest.raises(StoreMismatchError, match="file_list_sha256"):
        build_datasets(_cfg(reordered, tmp_path / "s", teacher_ckpt))
    with pytest.raises(StoreMismatchError, match="map_dtype is 'int8' in the store, 'fp16' here"):
        precompute(cfg, shard_size=8, show_progress=False, map_dtype="fp16")


def test_version_1_store_is_read_and_not_extended(folder, teacher_ckpt, tmp_path):
    import json

    path = tmp_path / "v1"
    path.mkdir()
    cfg = _cfg(folder, path, teacher_ckpt)
    from e2kd_fast.data.folders import ImageFolderDataset
    from e2kd_fast.data.frozen_store import store_identity

    identity = store_identity(cfg, ImageFolderDataset(folder, "train"))
    np.save(path / "logits.npy", np.ones((12, 3), np.float32))
    np.save(path / "maps.npy", np.full((12, 6, 16, 16), 0.5, np.float16))
    (path / "meta.json").write_text(json.dumps({**identity, "version": 1, "map_shape": [6, 16, 16], "completed": 5}))
    with pytest.raises(StoreMismatchError, match="incomplete version-1 store; delete it"):
        precompute(cfg, show_progress=False)
    (path / "meta.json").write_text(json.dumps({**identity, "version": 1, "map_shape": [6, 16, 16], "completed": 12}))
    with pytest.warns(UserWarning, match="records no fingerprints of its image files"):
        item = build_datasets(cfg).train[0]
    torch.testing.assert_close(item["teacher_map"], torch.full((6, 16, 16), 0.5))


def test_cli_precompute_reports_fidelity(folder, teacher_ckpt, tmp_path, capsys):
    import yaml

    cfg = _cfg(folder, tmp_path / "cli", teacher_ckpt)
    from e2kd_fast.config import config_to_dict

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    args = ["precompute", "--config", str(tmp_path / "c.yaml"), "--map-dtype", "bf16", "--shard-size", "6"]
    assert main([*args, "--report-fidelity", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| int8 | 1/2 |" in out and "cosine mean" in out and "holds 12 of 12 images (complete)" in out
    assert FrozenStore.open(tmp_path / "cli").map_dtype == "bf16"


def test_cli_precompute_says_what_it_wrote(folder, teacher_ckpt, tmp_path, capsys):
    import yaml

    from e2kd_fast.config import config_to_dict

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config_to_dict(_cfg(folder, tmp_path / "s", teacher_ckpt))))
    args = ["precompute", "--config", str(tmp_path / "c.yaml"), "--shard-size", "5", "--no-progress"]
    assert main([*args, "--max-shards", "0"]) == 0
    out = capsys.readouterr().out
    assert "nothing computed and no store created" in out and "written" not in out
    assert not (tmp_path / "s").exists()
    assert main([*args, "--max-shards", "1"]) == 0
    out = capsys.readouterr().out
    assert "wrote 1 shard(s) (5 images)" in out and "holds 5 of 12 images (2 shard(s) missing" in out
    assert main(args) == 0
    assert "wrote 2 shard(s) (7 images); the store now holds 12 of 12 images (complete)" in capsys.readouterr().out
    assert main([*args, "--max-shards", "-1"]) == 2
    assert "--max-shards" in capsys.readouterr().err


def test_an_image_repaired_or_changed_since_precompute_is_refused_by_name(teacher_ckpt, tmp_path):
    folder = write_image_folder(tmp_path / "d", classes=3, per_split={"train": 2}, size=(20, 20))
    paths = [p for p, _ in ImageFolderDataset(folder, "train").samples]
    broken, edited, touched = paths[1], paths[3], paths[4]  # in shards 0, 1 and 2 (2 images each)
    good = broken.read_bytes()
    broken.write_bytes(b"not an image")
    cfg = _cfg(folder, tmp_path / "s", teacher_ckpt)
    with pytest.warns(UserWarning, match="skipping unreadable image file"):
        precompute(cfg, shard_size=2, show_progress=False)
    train = build_datasets(cfg).train
    with pytest.warns(UserWarning, match=rf"{broken}: it was unreadable when .* was computed"):
        assert train[1] is None

    # Repaired under the same name: its stored outputs are zeros, so it is refused, not trained on.
    broken.write_bytes(good)
    with pytest.raises(StoreMismatchError, match=rf"{broken} changed since .*unreadable then.*precompute again"):
        train[1]
    # Edited content: refused too. Only touched (new mtime, same bytes): read, with one warning.
    write_image_folder(tmp_path / "other", classes=3, per_split={"train": 2}, size=(20, 20), seed=7)
    edited.write_bytes((tmp_path / "other" / edited.relative_to(folder)).read_bytes())
    with pytest.raises(StoreMismatchError, match=rf"{edited} changed since .*they are stale"):
        train[3]
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    with pytest.warns(UserWarning, match=rf"{touched} .*new modification time but the content"):
        assert train[4]["teacher_logits"].abs().sum() > 0

    # Precompute again: the shards of changed images are computed again, touched times recorded.
    untouched_maps = (tmp_path / "s" / "shards" / "maps_00002.npy").stat().st_mtime_ns
    logged = []
    precompute(cfg, shard_size=2, show_progress=False, log=logged.append)
    assert [line.split(":")[0] for line in logged if line.startswith("shard")] == ["shard 0", "shard 1"]
    assert "rank 0 wrote 2 shard(s) (4 images); the store now holds 6 of 6 images (complete)" in logged[-1]
    assert (tmp_path / "s" / "shards" / "maps_00002.npy").stat().st_mtime_ns == untouched_maps
    train = build_datasets(cfg).train
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped, nothing hashed
        items = [train[i] for i in range(6)]
    assert all(item["teacher_logits"].abs().sum() > 0 for item in items)


def test_a_store_without_fingerprints_is_read_with_a_warning(folder, teacher_ckpt, tmp_path):
    cfg = _cfg(folder, tmp_path / "s", teacher_ckpt)
    precompute(cfg, shard_size=8, show_progress=False)
    for old in (tmp_path / "s" / "shards").glob("files_*.npy"):
        old.unlink()  # as written before stores recorded their image files
    with pytest.warns(UserWarning, match="records no fingerprints of its image files"):
        train = build_datasets(cfg).train
    assert train[0]["teacher_map"].shape == (6, 16, 16)


def test_fidelity_leaves_unreadable_images_out_and_counts_them(teacher_ckpt, tmp_path):
    """An unreadable image's zero map would read as cosine 0 for every option; it is excluded and counted."""
    folder = write_image_folder(tmp_path / "d", classes=3, per_split={"train": 1}, size=(20, 20))
    ImageFolderDataset(folder, "train").samples[1][0].write_bytes(b"not an image")
    logged = []
    with pytest.warns(UserWarning, match="skipping unreadable image file"):
        precompute(
            _cfg(folder, tmp_path / "s", teacher_ckpt),
            shard_size=3,
            show_progress=False,
            report_fidelity=True,
            log=logged.append,
        )
    assert "fidelity of the storage options on shard 0 (2 images; 1 unreadable image(s) left out):" in logged
    table = logged[
        logged.index("fidelity of the storage options on shard 0 (2 images; 1 unreadable image(s) left out):") + 1
    ]
    fp32 = next(line for line in table.splitlines() if line.startswith("| fp32 | 1/1 |"))
    assert fp32.split("|")[4:6] == [" 1.000000 ", " 1.000000 "]  # cosine mean and min: exact
