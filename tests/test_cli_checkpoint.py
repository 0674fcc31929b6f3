"""The command line reads what a checkpoint knows: eval and explain without restating the model,
``export`` of a weights-only student, ``train --print-config`` and ``--dry-run``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from e2kd_fast.cli import main
from e2kd_fast.config import load_config
from e2kd_fast.models import ModelSpec, create_model, read_checkpoint, save_checkpoint
from tests.helpers import write_image_folder

SIZE = 16  # a model trained at 16 px: explain must not fall back to 224 / 256


def _config(tmp_path, **train) -> dict:
    folder = write_image_folder(tmp_path / "data", classes=3, per_split={"train": 4, "val": 1}, size=(20, 20))
    return {
        "student": {"name": "bcos_resnet20_cifar", "num_classes": 3, "kwargs": {"norm": "pn"}},
        "distill": {"method": "none"},
        "data": {"root": str(folder), "image_size": SIZE, "eval_resize": SIZE, "batch_size": 6, "num_workers": 0},
        "train": {"epochs": 1, "device": "cpu", "compile": False, "out_dir": str(tmp_path / "run"), **train},
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run shared by the tests: (its config file, last.pt)."""
    tmp_path = tmp_path_factory.mktemp("cli_checkpoint")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(_config(tmp_path)))
    assert main(["train", "--config", str(config), "--no-progress"]) == 0
    return config, tmp_path / "run" / "checkpoints" / "last.pt"


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(path)
    return path


def test_training_checkpoints_store_the_model_spec(trained):
    spec = ModelSpec.from_checkpoint(read_checkpoint(trained[1]))
    assert spec == ModelSpec(
        name="bcos_resnet20_cifar",
        num_classes=3,
        kwargs={"norm": "pn"},
        encoding="bcos",
        image_size=SIZE,
        eval_resize=SIZE,
        classes=["class_0", "class_1", "class_2"],
    )


def test_eval_needs_no_config_and_refuses_a_contradicting_one(trained, tmp_path, capsys):
    config, checkpoint = trained
    assert main(["eval", "--checkpoint", str(checkpoint)]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert main(["eval", "--checkpoint", str(checkpoint), "--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out) == alone and alone["images"] == 3

    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "student": {"name": "resnet18"}}))
    assert main(["eval", "--checkpoint", str(checkpoint), "--config", str(other)]) == 2
    err = capsys.readouterr().err
    assert "student.name is 'resnet18'" in err and "bcos_resnet20_cifar" in err


def test_explain_takes_model_size_and_classes_from_the_checkpoint(trained, image, tmp_path, capsys):
    out = tmp_path / "explained"
    assert main(["explain", str(image), "--checkpoint", str(trained[1]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "'class_" in printed  # the class name, from the checkpoint
    (picture,) = out.glob("photo_class*.png")
    assert Image.open(picture).size == (2 * SIZE, SIZE)  # input and explanation side by side, at 16 px

    assert main(["explain", str(image), "--checkpoint", str(trained[1]), "--model", "resnet18"]) == 2
    assert "--model resnet18 contradicts" in capsys.readouterr().err
    assert main(["explain", str(image), "--checkpoint", str(trained[1]), "--num-classes", "5"]) == 2
    assert "--num-classes 5 contradicts" in capsys.readouterr().err


def test_saved_models_say_what_they_are(tmp_path):
    path = save_checkpoint(create_model("bcos_resnet20_cifar", num_classes=3, norm="pn"), tmp_path / "m.pt")
    spec = ModelSpec.from_checkpoint(read_checkpoint(path))
    assert (spec.name, spec.num_classes, spec.kwargs) == ("bcos_resnet20_cifar", 3, {"norm": "pn"})
    assert spec.image_size is None and spec.classes is None  # what only a training run knows


def test_old_checkpoints_without_a_spec_still_work_with_flags(image, tmp_path, capsys):
    plain = tmp_path / "plain.pt"
    torch.save(create_model("bcos_resnet20_cifar", num_classes=3).state_dict(), plain)  # as official teacher files
    assert main(["explain", str(image), "--checkpoint", str(plain), "--out", str(tmp_path / "a")]) == 2
    assert "--model is needed" in capsys.readouterr().err
    args = ["explain", str(image), "--checkpoint", str(plain), "--model", "bcos_resnet20_cifar", "--num-classes", "3"]
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert "does not say its image size: using 224" in capsys.readouterr().err  # said, not silent
    assert main([*args, "--image-size", "24", "--out", str(tmp_path / "c")]) == 0
    (picture,) = (tmp_path / "c").glob("*_class*.png")  # beside explanations.png, the labelled grid
    assert Image.open(picture).size == (48, 24)


def test_export_writes_a_weights_only_student_that_explain_and_eval_accept(trained, image, tmp_path, capsys):
    config, checkpoint = trained
    exported = tmp_path / "student.pt"
    assert main(["export", str(checkpoint.parents[1]), "--out", str(exported)]) == 0  # a run folder: its last.pt
    assert "3 named classes" in capsys.readouterr().out
    payload = read_checkpoint(exported)
    assert set(payload) == {"format", "version", "arch", "model", "model_spec"}  # no optimiser state, no config
    assert ModelSpec.from_checkpoint(payload) == ModelSpec.from_checkpoint(read_checkpoint(checkpoint))
    assert exported.stat().st_size < checkpoint.stat().st_size

    assert main(["explain", str(image), "--checkpoint", str(exported), "--out", str(tmp_path / "x")]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(exported)]) == 2
    assert "holds no run config" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(exported), "--config", str(config)]) == 0


def test_print_config_and_dry_run(trained, tmp_path, capsys):
    config = trained[0]
    assert main(["train", "--config", str(config), "--set", "optim.lr=0.5", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    merged = tmp_path / "merged.yaml"
    merged.write_text(yaml.safe_dump(printed))
    assert load_config(merged) == load_config(config, ["optim.lr=0.5"])

    fresh = tmp_path / "fresh.yaml"
    fresh.write_text(yaml.safe_dump({**printed, "train": {**printed["train"], "out_dir": str(tmp_path / "new")}}))
    assert main(["train", "--config", str(fresh), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "data: 3 classes" in out and "12 training images, 3 validation images" in out
    assert "1 epochs × 2 steps" in out
    assert "run folder: to be created" in out
    assert not (tmp_path / "new").exists()  # nothing written
    # The used run folder and a misspelt teacher argument are found as training would find them.
    assert main(["train", "--config", str(config), "--dry-run"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    teacher = ["--set", "teacher.name=bcos_resnet20_cifar", "--set", "teacher.kwargs={nrom: pn}"]
    assert main(["train", "--config", str(fresh), *teacher, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "teacher.kwargs.nrom is not an argument of bcos_resnet20_cifar" in err and "norm" in err


def test_a_student_trained_with_kwargs_loads_as_a_teacher_with_teacher_kwargs(trained, tmp_path, capsys):
    config, checkpoint = trained
    distil = [
        "--set",
        f"train.out_dir={tmp_path / 'distilled'}",
        "--set",
        "teacher.name=bcos_resnet20_cifar",
        "--set",
        "teacher.num_classes=3",
        "--set",
        f"teacher.checkpoint={checkpoint}",
        "--set",
        "distill.method=kd",
    ]
    assert main(["train", "--config", str(config), *distil, "--set", "teacher.kwargs={norm: pn}", "--dry-run"]) == 0
    assert "teacher bcos_resnet20_cifar (" in capsys.readouterr().out
    assert main(["train", "--config", str(config), *distil, "--dry-run"]) == 2  # the default norm does not fit
    assert "teacher.kwargs: {norm: pn}" in capsys.readouterr().err
