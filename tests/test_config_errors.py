"""Config and model-setting errors reach the user as one line that names the key, the value and its source.

A wrong model name, a keyword argument the model does not take and a class count left at the
model's default are refused before training, naming the setting; an error that a ``--set`` override
causes is blamed on that override, not on the YAML file it was applied over.
"""

from __future__ import annotations

import pytest
import yaml

from e2kd_fast.cli import main
from e2kd_fast.config import config_from_dict, load_config
from e2kd_fast.engine.builders import build_student, build_teacher
from tests.helpers import write_image_folder


def _settings(tmp_path, root=None) -> dict:
    return {
        "student": {"name": "bcos_resnet20_cifar", "num_classes": 3},
        "teacher": {"name": "bcos_resnet20_cifar", "num_classes": 3},
        "distill": {"method": "e2kd", "lam": 1.0},
        "data": {"root": str(root or tmp_path), "image_size": 16, "eval_resize": 16, "batch_size": 4, "num_workers": 0},
        "train": {"epochs": 1, "out_dir": str(tmp_path / "run"), "device": "cpu", "compile": False},
    }


@pytest.fixture
def config_file(tmp_path):
    folder = write_image_folder(tmp_path / "data", classes=3, per_split={"train": 2}, size=(20, 20))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_settings(tmp_path, folder)))
    return path


def _cli_error(capsys, config_file, *overrides: str) -> str:
    """Runs ``e2kd-fast train`` with the overrides; asserts it failed as a user error (status 2) and
    returns its one-line message."""
    args = ["train", "--config", str(config_file), "--no-progress"]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("e2kd-fast train: error: ")
    return err.removeprefix("e2kd-fast train: error: ")


def test_unknown_model_names_are_refused_by_key_with_close_matches(config_file, capsys):
    err = _cli_error(capsys, config_file, "student.name=bcos_resnet99")
    assert err.startswith("student.name 'bcos_resnet99' is not a registered model; did you mean bcos_resnet")
    # A standard name under KD (no explanation, so no B-cos check in the config itself).
    err = _cli_error(capsys, config_file, "distill.method=kd", "teacher.name=resnet99", "teacher.num_classes=3")
    assert err.startswith("teacher.name 'resnet99' is not a registered model; did you mean ")
    assert "resnet18" in err


def test_model_arguments_are_checked_by_key(config_file, capsys, tmp_path):
    err = _cli_error(capsys, config_file, "student.kwargs.foo=1")
    assert err.startswith("student.kwargs.foo is not an argument of bcos_resnet20_cifar (accepted: ")
    assert "norm" in err and "max_out" in err
    err = _cli_error(capsys, config_file, "teacher.kwargs={inplanes: 8}")
    assert err == "teacher.kwargs.inplanes is set by bcos_resnet20_cifar itself and cannot be given"
    err = _cli_error(capsys, config_file, "student.kwargs.num_classes=3")
    assert err == "student.kwargs.num_classes is not a keyword argument here: set student.num_classes"
    # A torchvision model, whose arguments are known only when it is built; and a wrong value.
    standard = config_from_dict(
        {**_settings(tmp_path), "student": {"name": "resnet18", "kwargs": {"foo": 1}}, "distill": {"method": "none"}}
    )
    with pytest.raises(ValueError, match=r"^student\.kwargs\.foo is not an argument of resnet18$"):
        build_student(standard)
    bad_norm = config_from_dict(
        {**_settings(tmp_path), "teacher": {"name": "bcos_resnet20_cifar", "kwargs": {"norm": "xyz"}}}
    )
    with pytest.raises(
        ValueError,
        match=r"^teacher\.name 'bcos_resnet20_cifar' with num_classes=None and kwargs "
        r"\{'norm': 'xyz'\} cannot be built: unknown norm 'xyz'",
    ):
        build_teacher(bad_norm)


def test_a_class_count_left_at_the_model_default_must_match_the_data(config_file, capsys):
    err = _cli_error(capsys, config_file, "student.num_classes=null")
    assert err.startswith("student.num_classes is 10 (the model's default) but ")
    assert err.endswith("train has 3 class folders: set student.num_classes")
    err = _cli_error(capsys, config_file, "teacher.num_classes=null")
    assert err.startswith("teacher.num_classes is 10 (the model's default) but ")


def test_set_errors_are_blamed_on_the_override_not_the_file(config_file, capsys):
    name = config_file.name
    cases = {
        "optim.lr=fast": r"optim\.lr: expected float, got str 'fast'",
        "train.epochs=1e2": r"train\.epochs: expected int, got float 100\.0",
        "distill.explanation=gradcam": r"distill\.explanation 'gradcam' is meant for standard",
        "optim.lrr=1": r"unknown key 'optim\.lrr'",
    }
    for item, problem in cases.items():
        with pytest.raises(ValueError, match=rf"^--set '{item}': {problem}") as raised:
            load_config(config_file, ["train.seed=3", item, "data.num_workers=0"])
        assert not str(raised.value).startswith(str(config_file))
    # The CLI prints the same: the override first, then the file it was applied over.
    err = _cli_error(capsys, config_file, "optim.lr=fast")
    assert err.startswith("--set 'optim.lr=fast': optim.lr: expected float") and err.endswith(f"{name})")
    # An error in the file itself is still the file's, whatever overrides come with it.
    broken = config_file.with_name("broken.yaml")
    broken.write_text(config_file.read_text() + "optim: {lr: slow}\n")
    with pytest.raises(ValueError, match=r"broken\.yaml: optim\.lr: expected float, got str 'slow'"):
        load_config(broken, ["train.seed=3"])
    # A file that is valid only with its overrides (a key the file leaves out) loads.
    partial = config_file.with_name("partial.yaml")
    partial.write_text("distill: {method: none}\n")
    assert load_config(partial, ["student.name=bcos_resnet18"]).student.name == "bcos_resnet18"


def test_booleans_are_true_or_false_and_each_key_comes_once(config_file):
    # YAML 1.1 reads yes / no / on / off as booleans; here they are strings, refused by key.
    for spelling in ("yes", "on", "No"):
        with pytest.raises(ValueError, match=rf"train\.compile: expected bool or 'auto', got str '{spelling}'"):
            load_config(config_file, [f"train.compile={spelling}"])
    assert load_config(config_file, ["train.compile=True"]).train.compile is True
    text = config_file.read_text()
    yes = config_file.with_name("yes.yaml")
    yes.write_text(text.replace("compile: false", "compile: yes"))
    with pytest.raises(ValueError, match=r"yes\.yaml: train\.compile: expected bool or 'auto', got str 'yes'"):
        load_config(yes)
    # A key given twice (the second would silently win) is an error at its line.
    twice = config_file.with_name("twice.yaml")
    twice.write_text(text + "train: {epochs: 5}\n")
    line = len(text.splitlines()) + 1
    with pytest.raises(ValueError, match=rf"twice\.yaml: invalid YAML at line {line}, column 1: duplicate key 'train'"):
        load_config(twice)
