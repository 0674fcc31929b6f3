"""The command line, dataset building from configs, and the frozen-explanation store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from e2kd_fast import __version__
from e2kd_fast.cli import main
from e2kd_fast.config import config_from_dict
from e2kd_fast.data import paired_train_transform
from e2kd_fast.data.build import build_datasets
from e2kd_fast.data.frozen_store import FrozenStore, FrozenTeacherDataset, StoreMismatchError, full_image_dataset
from e2kd_fast.engine import read_metrics
from e2kd_fast.engine.precompute import precompute
from e2kd_fast.explain import dynamic_weights
from e2kd_fast.models import create_model, save_checkpoint
from tests.helpers import pixel_format_cases, write_image_folder


@pytest.fixture
def folder(tmp_path):
    return write_image_folder(tmp_path / "data", classes=3, per_split={"train": 4, "val": 2}, size=(24, 28))


def _config_dict(folder, tmp_path, **sections) -> dict:
    cfg = {
        "student": {"name": "bcos_resnet20_cifar", "num_classes": 3},
        "teacher": {"name": "bcos_resnet20_cifar", "num_classes": 3},
        "distill": {"method": "e2kd", "lam": 1.0},
        "data": {"root": str(folder), "image_size": 16, "eval_resize": 16, "batch_size": 4, "num_workers": 0},
        "train": {
            "epochs": 1,
            "out_dir": str(tmp_path / "run"),
            "device": "cpu",
            "log_every_steps": 1,
            "compile": False,
        },
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def _write_yaml(path, cfg: dict):
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_train_eval_and_resume(folder, tmp_path, capsys):
    config = _write_yaml(tmp_path / "run.yaml", _config_dict(folder, tmp_path))
    assert main(["train", "--config", str(config), "--set", "optim.lr=3e-4", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3 and summary["final_eval"]["images"] == 6
    assert read_metrics(tmp_path / "run", "train")[0]["lr"] == pytest.approx(3e-4 * 0.01)  # warm-up start
    # Resuming without the run's own --set is refused, naming the key; resuming a finished run does nothing more.
    assert main(["train", "--config", str(config), "--resume", "auto", "--no-progress"]) == 2
    assert "optim.lr: 0.0003 → 0.001" in capsys.readouterr().err
    assert main(["train", "--config", str(config), "--set", "optim.lr=3e-4", "--resume", "auto", "--no-progress"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["steps"] == 3 and again["final_eval"] == summary["final_eval"]
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    assert main(["eval", "--config", str(config), "--checkpoint", str(checkpoint)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"top1", "top5", "agreement", "explanation_cosine"} <= set(metrics)


def test_cli_errors_name_the_key(folder, tmp_path, capsys):
    config = _write_yaml(tmp_path / "run.yaml", _config_dict(folder, tmp_path))
    assert main(["train", "--config", str(config), "--set", "optim.learning_rate=1"]) == 2
    err = capsys.readouterr().err
    assert "optim.learning_rate" in err and "lr" in err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_cli_explain_writes_pictures(tmp_path, capsys):
    image = tmp_path / "bird.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(image)
    model = create_model("bcos_resnet20_cifar", num_classes=3)
    checkpoint = save_checkpoint(model, tmp_path / "model.pt")
    args = ["explain", str(image), "--model", "bcos_resnet20_cifar", "--num-classes", "3"]
    args += ["--checkpoint", str(checkpoint), "--image-size", "32", "--resize", "32", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert any(name.startswith("bird_class") and name.endswith(".png") for name in written)
    assert "bird_contributions.npy" in written and "explanations.png" in written  # the labelled grid
    standard = ["explain", str(image), "--model", "resnet18", "--num-classes", "3", "--image-size", "32"]
    names = ["--class-names", "cat,dog,bird"]
    assert main([*standard, "--resize", "32", "--target", "1", "--out", str(tmp_path / "std"), *names]) == 0
    assert (tmp_path / "std" / "bird_class1.png").is_file() and (tmp_path / "std" / "explanations.png").is_file()
    assert main([*standard, "--resize", "32", "--out", str(tmp_path / "x"), "--class-names", "cat"]) == 2
    assert "1 class names given (--class-names) for a model of 3 classes" in capsys.readouterr().err


def test_cli_explain_reads_a_16_bit_gray_image_as_its_8_bit_twin(tmp_path, capsys):
    cases = pixel_format_cases(size=(20, 20))
    for name in ("gray8", "gray16"):
        (tmp_path / f"{name}.png").write_bytes(cases[name][0])
    model = create_model("bcos_resnet20_cifar", num_classes=3)
    args = ["--model", "bcos_resnet20_cifar", "--num-classes", "3", "--checkpoint"]
    args += [str(save_checkpoint(model, tmp_path / "model.pt")), "--image-size", "16", "--resize", "16"]
    for name in ("gray8", "gray16"):
        assert main(["explain", str(tmp_path / f"{name}.png"), *args, "--out", str(tmp_path / name)]) == 0
    eight, sixteen = (np.load(tmp_path / n / f"{n}_contributions.npy") for n in ("gray8", "gray16"))
    np.testing.assert_array_equal(sixteen, eight)


def test_held_out_and_few_shot_splits_from_the_config(folder, tmp_path):
    cfg = config_from_dict(_config_dict(folder, tmp_path, data={"val_per_class": 1, "shots": 2}))
    data = build_datasets(cfg)
    assert len(data.val_indices) == 3 and len(data.train_indices) == 6
    assert not set(data.val_indices.tolist()) & set(data.train_indices.tolist())
    assert data.classes == ["class_0", "class_1", "class_2"]
    item = data.train[int(data.train_indices[0])]
    assert item["image"].shape == (6, 16, 16)
    with pytest.raises(ValueError, match="data.root is not set"):
        build_datasets(config_from_dict(_config_dict(folder, tmp_path, data={"root": None})))


def test_val_folders_that_differ_from_the_training_classes_are_refused(folder, tmp_path):
    cfg = config_from_dict(_config_dict(folder, tmp_path))
    assert build_datasets(cfg).val.classes == ["class_0", "class_1", "class_2"]
    val = folder / "val"
    (val / "class_1").rename(tmp_path / "class_1")  # class_2's images would be labelled 1
    with pytest.raises(ValueError, match=r"missing: class_1; extra: none"):
        build_datasets(cfg)
    (tmp_path / "class_1").rename(val / "class_1")
    (val / "class_0").rename(val / "aardvark")  # sorts first: every image would carry another class's id
    with pytest.raises(ValueError, match=r"missing: class_0; extra: aardvark"):
        build_datasets(cfg, train=False)


def test_precompute_store_is_exact_resumable_and_checked(folder, tmp_path):
    store_path = tmp_path / "store"
    torch.manual_seed(0)
    teacher = create_model("bcos_resnet20_cifar", num_classes=3)
    teacher_ckpt = save_checkpoint(teacher, tmp_path / "teacher.pt")
    frozen_teacher = {"mode": "frozen", "store": str(store_path), "checkpoint": str(teacher_ckpt)}
    cfg = config_from_dict(_config_dict(folder, tmp_path, teacher=frozen_teacher))
    precompute(cfg, chunk=5, show_progress=False)
    store = FrozenStore.open(store_path)
    assert store.complete and store.meta["num_images"] == 12 and store.maps.shape == (12, 6, 16, 16)

    # The stored maps are the teacher's explanations of the whole images (fp16).
    full = full_image_dataset(cfg, "bcos")
    x = torch.stack([full[i]["image"] for i in range(12)])
    maps, logits = dynamic_weights(teacher.eval(), x, None, return_logits=True)
    torch.testing.assert_close(torch.from_numpy(np.array(store.logits)), logits.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(np.array(store.maps)).float(), maps, rtol=2e-3, atol=1e-4)

    # An interrupted precompute continues where it stopped (a shard without its maps file is missing).
    for shard in (1, 2):
        (store_path / "shards" / f"maps_{shard:05d}.npy").unlink()
    assert not FrozenStore.open(store_path).complete
    precompute(cfg, chunk=5, show_progress=False)
    torch.testing.assert_close(
        torch.from_numpy(np.array(FrozenStore.open(store_path).maps)).float(), maps, rtol=2e-3, atol=1e-4
    )

    # Training reads it with the paired crop; a store for other data is refused.
    data = build_datasets(cfg)
    item = data.train[0]
    assert item["teacher_map"].shape == (6, 16, 16) and item["teacher_logits"].shape == (3,)
    other = write_image_folder(tmp_path / "other", classes=3, per_split={"train": 4}, size=(24, 28), seed=5)
    (other / "train" / "class_0" / "0.jpg").rename(other / "train" / "class_0" / "renamed.jpg")
    moved = config_from_dict(_config_dict(other, tmp_path, teacher=frozen_teacher))
    with pytest.raises(StoreMismatchError, match="file_list_sha256"):
        build_datasets(moved)


def test_incomplete_store_is_refused(folder, tmp_path):
    store = FrozenStore.create(tmp_path / "s", {"num_images": 12}, num_classes=3, map_shape=(6, 4, 4))
    base = full_image_dataset(config_from_dict(_config_dict(folder, tmp_path)), "bcos").base
    with pytest.raises(StoreMismatchError, match=r"incomplete \(0 of 12 images\)"):
        FrozenTeacherDataset(base, store, paired_train_transform(16, encoding="bcos"))
    with pytest.raises(FileNotFoundError, match="run e2kd-fast precompute"):
        FrozenStore.open(tmp_path / "nowhere")


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"e2kd-fast {__version__}"
