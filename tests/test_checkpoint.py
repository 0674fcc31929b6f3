"""Checkpoint loading: every accepted format, round trips, and every error path (nothing half-loaded)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torchvision
from bcos.models import pretrained as official_zoo
from bcos.models.resnet import cifar10_resnet20

from e2kd_fast import AddInverse, create_model, load_checkpoint, save_checkpoint
from e2kd_fast.models import CheckpointError, read_checkpoint
from tests.helpers import randomize_norms, rel_err


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed although loading failed"


def test_round_trip_of_our_checkpoint(tmp_path):
    model = create_model("bcos_resnet20_cifar")
    path = save_checkpoint(model, tmp_path / "ckpt" / "model.pt", epoch=3, note="demo")
    assert not list(path.parent.glob(".*.tmp")), "temporary file left behind"
    payload = read_checkpoint(path)
    assert payload["arch"] == "bcos_resnet20_cifar" and payload["epoch"] == 3
    fresh = create_model("bcos_resnet20_cifar")
    report = load_checkpoint(fresh, path)
    assert report.kind == "e2kd-fast" and report.num_tensors == len(model.state_dict())
    x6 = AddInverse()(torch.rand(2, 3, 32, 32))
    torch.testing.assert_close(fresh.eval()(x6), model.eval()(x6), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("ours", "official", "filename"),
    [
        ("bcos_densenet169", official_zoo.densenet169, "densenet_169-7037ee0604.pth"),
        ("bcos_resnet34", official_zoo.resnet34, "resnet_34-a63425a03e.pth"),
        ("bcos_vit_ti_patch16_224", official_zoo.simple_vit_ti_patch16_224, "bcos_simple_vit_ti_patch16_224.pth"),
    ],
)
def test_official_teacher_files_load(tmp_path, ours, official, filename):
    """The official teacher files are plain state dicts of the official models."""
    reference = official().eval()
    torch.save(reference.state_dict(), tmp_path / filename)
    model = create_model(ours).eval()
    load_checkpoint(model, tmp_path / filename)
    x6 = AddInverse()(torch.rand(1, 3, 32, 32))
    torch.testing.assert_close(model(x6), reference(x6), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def official_cifar_state() -> dict[str, torch.Tensor]:
    """A state dict of the official ``cifar10_resnet20()`` with its default (position) norms."""
    torch.manual_seed(0)
    return randomize_norms(cifar10_resnet20()).state_dict()


def test_official_cifar_file_loads_with_position_norms(tmp_path, official_cifar_state):
    """The official CIFAR entry points build position norms: their files load into norm="pn" exactly."""
    reference = cifar10_resnet20()
    reference.load_state_dict(official_cifar_state)
    torch.save(official_cifar_state, tmp_path / "cifar10_resnet20.pth")
    model = create_model("bcos_resnet20_cifar", norm="pn")
    load_checkpoint(model, tmp_path / "cifar10_resnet20.pth")
    model, reference = model.double().eval(), reference.double().eval()
    x6 = AddInverse()(torch.rand(2, 3, 32, 32, dtype=torch.float64))
    assert rel_err(model(x6), reference(x6)) < 1e-12


def test_config_teacher_takes_the_official_cifar_file(tmp_path, official_cifar_state):
    """``teacher.kwargs: {norm: pn}`` builds the teacher the official file was saved from."""
    from e2kd_fast.config import load_config
    from e2kd_fast.engine.builders import build_teacher

    torch.save(official_cifar_state, tmp_path / "cifar10_resnet20.pth")
    config = Path(__file__).parents[1] / "configs" / "waterbirds_bcos_r18_from_r50_e2kd.yaml"
    overrides = [
        "teacher.name=bcos_resnet20_cifar",
        "teacher.num_classes=10",
        "student.num_classes=10",
        f"teacher.checkpoint={tmp_path / 'cifar10_resnet20.pth'}",
        "teacher.kwargs={norm: pn}",
    ]
    teacher = build_teacher(load_config(config, overrides))
    assert not any("running_mean" in key for key in teacher.state_dict())


def test_official_cifar_file_into_default_model_names_position_norms(tmp_path, official_cifar_state):
    torch.save(official_cifar_state, tmp_path / "cifar10_resnet20.pth")
    model = create_model("bcos_resnet20_cifar")  # uncentred batch norms: running statistics expected
    before = _snapshot(model)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(model, tmp_path / "cifar10_resnet20.pth")
    message = str(info.value)
    assert "42 missing keys (bn1.running_mean" in message
    assert "looks saved with position norms (no running statistics)" in message
    assert 'norm="pn"' in message and 'create_model("bcos_resnet20_cifar", norm="pn")' in message
    assert "student.kwargs / teacher.kwargs: {norm: pn}" in message
    _assert_unchanged(model, before)


def test_batch_norm_file_into_position_norm_model_names_batch_norms():
    state = create_model("bcos_resnet20_cifar").state_dict()
    model = create_model("bcos_resnet20_cifar", norm="pn")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(model, state)
    message = str(info.value)
    assert "63 unexpected keys (bn1.running_mean" in message
    assert "looks saved with uncentred batch norms (with running statistics)" in message
    assert "the model has position norms" in message
    assert 'norm="bnu", the default' in message


@pytest.mark.parametrize(
    ("file_norm", "model_norm", "says"), [("none", "bnu", 'norm="none"'), ("bnu", "none", 'norm="bnu"')]
)
def test_norm_hint_covers_models_without_norms(file_norm, model_norm, says):
    state = create_model("bcos_resnet20_cifar", norm=file_norm).state_dict()
    with pytest.raises(CheckpointError, match="looks saved with") as info:
        load_checkpoint(create_model("bcos_resnet20_cifar", norm=model_norm), state)
    assert says in str(info.value)


def test_no_norm_hint_for_other_mismatches():
    """A single missing buffer or another architecture is not taken for another norm kind."""
    state = create_model("bcos_resnet20_cifar").state_dict()
    del state["bn1.running_var"]
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(create_model("bcos_resnet20_cifar"), state)
    assert "looks saved" not in str(info.value)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(
            create_model("bcos_resnet32_cifar", norm="pn"), create_model("bcos_resnet20_cifar").state_dict()
        )
    assert "looks saved" not in str(info.value)


def test_torchvision_checkpoints_including_legacy_densenet_names(tmp_path):
    source = torchvision.models.densenet121(weights=None)
    legacy = {}
    for key, value in source.state_dict().items():  # old torchvision files say "norm.1", "conv.2", ...
        if key.endswith("num_batches_tracked"):  # ... and predate this buffer
            continue
        for old, new in (("norm1", "norm.1"), ("conv1", "conv.1"), ("norm2", "norm.2"), ("conv2", "conv.2")):
            if ".denselayer" in key and f".{old}." in key:
                key = key.replace(f".{old}.", f".{new}.")
        legacy[key] = value
    torch.save(legacy, tmp_path / "densenet121-a639ec97.pth")
    model = create_model("densenet121")
    load_checkpoint(model, tmp_path / "densenet121-a639ec97.pth")
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)

    resnet = torchvision.models.resnet34(weights=None)
    target = create_model("resnet34")
    load_checkpoint(target, resnet.state_dict())
    assert torch.equal(target.fc.weight, resnet.fc.weight)


def test_wrapped_and_prefixed_state_dicts():
    model = create_model("bcos_resnet20_cifar")
    state = model.state_dict()
    lightning = {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 7}
    assert load_checkpoint(create_model("bcos_resnet20_cifar"), lightning).stripped_prefix == "model."
    ddp_compiled = {f"module._orig_mod.{k}": v for k, v in state.items()}
    assert load_checkpoint(create_model("bcos_resnet20_cifar"), ddp_compiled).stripped_prefix == "module._orig_mod."
    combined = {**{f"student.{k}": v for k, v in state.items()}, "teacher.x": torch.zeros(1)}
    assert load_checkpoint(create_model("bcos_resnet20_cifar"), combined, prefix="student.").num_tensors == len(state)


def test_missing_and_unexpected_keys_are_named_and_nothing_is_loaded():
    model = create_model("bcos_resnet20_cifar")
    before = _snapshot(model)
    state = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in model.state_dict().items()}
    del state["fc.linear.weight"]
    state["head.extra"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(model, state)
    message = str(info.value)
    assert "1 missing keys (fc.linear.weight)" in message
    assert "1 unexpected keys (head.extra)" in message
    assert "Nothing was loaded" in message
    _assert_unchanged(model, before)


def test_shape_mismatch_names_tensor_and_both_shapes():
    model = create_model("bcos_resnet20_cifar", num_classes=10)
    before = _snapshot(model)
    other = create_model("bcos_resnet20_cifar", num_classes=100).state_dict()
    with pytest.raises(
        CheckpointError, match=r"fc\.linear\.weight: checkpoint \[100, 64, 1, 1\] vs model \[10, 64, 1, 1\]"
    ):
        load_checkpoint(model, other)
    _assert_unchanged(model, before)


def test_files_needing_code_execution_are_refused(tmp_path):
    path = tmp_path / "pickled_model.pt"
    torch.save(create_model("bcos_resnet20_cifar"), path)  # a whole pickled module, not a state dict
    model = create_model("bcos_resnet20_cifar")
    before = _snapshot(model)
    with pytest.raises(CheckpointError, match="refused: .* executing code .* weights_only=True"):
        load_checkpoint(model, path)
    _assert_unchanged(model, before)


def test_unreadable_and_missing_files(tmp_path):
    model = create_model("bcos_resnet20_cifar")
    with pytest.raises(FileNotFoundError, match="checkpoint file not found: .*nope.pt"):
        load_checkpoint(model, tmp_path / "nope.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt: not a readable PyTorch checkpoint"):
        load_checkpoint(model, garbage)
    truncated = tmp_path / "truncated.pt"
    torch.save(model.state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated.pt: not a readable"):
        load_checkpoint(model, truncated)


def test_objects_that_are_not_state_dicts(tmp_path):
    model = create_model("bcos_resnet20_cifar")
    with pytest.raises(CheckpointError, match="expected a state dict .* got list"):
        load_checkpoint(model, [1, 2, 3])
    with pytest.raises(CheckpointError, match=r"2 entries are not tensors \(epoch, lr\)"):
        load_checkpoint(model, {"epoch": 1, "lr": 0.1, "w": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="no keys start with the prefix 'teacher.'"):
        load_checkpoint(model, model.state_dict(), prefix="teacher.")
    with pytest.raises(CheckpointError, match="'model' entry is NoneType"):
        load_checkpoint(model, {"format": "e2kd-fast/checkpoint", "model": None})


def test_failed_save_leaves_previous_file_intact(tmp_path, monkeypatch):
    model = create_model("bcos_resnet20_cifar")
    path = save_checkpoint(model, tmp_path / "model.pt")
    original = path.read_bytes()

    def broken_save(*args, **kwargs):
        raise pickle.PicklingError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(pickle.PicklingError):
        save_checkpoint(model, path)
    assert path.read_bytes() == original
    assert not list(tmp_path.glob(".*.tmp"))
