"""Batch norm over image groups (train.bn_group_size): each group as its own rank, one device.

Checked against the norms run on each group separately, against the autograd explanation, and
against a 4-process DDP run on the CPU (gloo) whose ranks each normalise their own share.
"""

from __future__ import annotations

import copy
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from torch import nn

from e2kd_fast import AddInverse, explanation_mode
from e2kd_fast.config import config_from_dict, load_config
from e2kd_fast.distill import e2kd_objective
from e2kd_fast.engine import Trainer
from e2kd_fast.engine.process_group import find_free_port
from e2kd_fast.explain import dynamic_weights
from e2kd_fast.models import create_model, read_checkpoint
from e2kd_fast.nn import (
    BatchNormUncentered2d,
    BcosConv2d,
    GhostBatchNorm2d,
    batch_norm_group_indices,
    set_batch_norm_groups,
)
from tests.helpers import set_rank_environment
from tests.test_trainer import ShapesSet

WORLD = 4


def test_group_indices_deal_images_as_samplers_deal_them_to_ranks():
    assert [g.tolist() for g in batch_norm_group_indices(8, 4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert [g.tolist() for g in batch_norm_group_indices(7, 3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert [g.tolist() for g in batch_norm_group_indices(2, 4)] == [[0], [1]]  # a short last batch


def _per_group(norm: nn.Module, x: torch.Tensor, groups: int) -> tuple[torch.Tensor, nn.Module]:
    """Each group through its own copy of ``norm`` (one group each, as on separate ranks); group 0's copy returned."""
    out, first = torch.empty_like(x), None
    for g, index in enumerate(batch_norm_group_indices(x.shape[0], groups)):
        rank_norm = copy.deepcopy(norm)
        out[index] = rank_norm(x[index])
        first = rank_norm if g == 0 else first
    return out, first


@pytest.mark.parametrize(("n", "groups"), [(8, 4), (7, 3), (2, 4), (6, 1)])
@pytest.mark.parametrize("kind", ["uncentred", "torch"])
def test_groups_are_normalised_as_on_their_own_ranks(kind, n, groups):
    torch.manual_seed(0)
    plain = BatchNormUncentered2d(5) if kind == "uncentred" else nn.BatchNorm2d(5)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 2)
        plain.running_var.uniform_(0.5, 2)
    holder = nn.Sequential(copy.deepcopy(plain)).train()
    assert set_batch_norm_groups(holder, groups) == 1
    grouped = holder[0]
    assert isinstance(grouped, BatchNormUncentered2d if kind == "uncentred" else GhostBatchNorm2d)
    x = torch.randn(n, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    plain, grouped = plain.double().train(), grouped.double()
    expected, rank0 = _per_group(plain, x, groups)
    got = grouped(x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # The running statistics follow group 0, as DDP keeps rank 0's buffers.
    for key, buffer in rank0.named_buffers():
        torch.testing.assert_close(dict(grouped.named_buffers())[key], buffer, rtol=1e-12, atol=0, msg=key)
    # The gradient too: each group's statistics are differentiated within the group alone.
    direction = torch.randn_like(x)
    (g_got,) = torch.autograd.grad((got * direction).sum(), x)
    (g_expected,) = torch.autograd.grad((expected * direction).sum(), x)
    torch.testing.assert_close(g_got, g_expected, rtol=1e-11, atol=1e-12)
    # Eval mode is plain batch norm with the running statistics.
    torch.testing.assert_close(grouped.eval()(x), rank0.eval()(x), rtol=1e-12, atol=1e-12)


def test_torchvision_batch_norms_are_replaced_keeping_parameters_buffers_and_keys():
    model = torchvision.models.resnet18(num_classes=3)
    keys, params = list(model.state_dict()), list(model.parameters())
    assert set_batch_norm_groups(model, 2) == 20
    assert list(model.state_dict()) == keys
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))  # the optimiser's tensors
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    with pytest.raises(ValueError, match="batch-norm groups must be >= 1"):
        set_batch_norm_groups(model, 0)


def test_the_sweep_explains_a_grouped_student_as_autograd_does():
    """Training-mode explanations with per-group 1/std ([N, C, 1, 1] on the sweep's tape)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        BcosConv2d(6, 6, 3, padding=1),
        BatchNormUncentered2d(6),
        BcosConv2d(6, 4, 3, stride=2, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ).double()
    set_batch_norm_groups(net, 3)
    net.train()
    x = AddInverse()(torch.rand(6, 3, 8, 8, dtype=torch.float64))
    target = torch.tensor([0, 1, 2, 3, 0, 1])
    with explanation_mode(net):
        sweep = dynamic_weights(net, x, target, algorithm="sweep")
        reference = dynamic_weights(net, x, target, algorithm="autograd")
    torch.testing.assert_close(sweep, reference, rtol=1e-10, atol=1e-12)


def _config(out_dir: Path, batch: int, group: int | None):
    return config_from_dict(
        {
            "student": {"name": "bcos_resnet20_cifar", "num_classes": 4},
            "teacher": {"name": "bcos_resnet20_cifar", "num_classes": 4},
            "distill": {"method": "e2kd", "lam": 1.0},
            # SGD: Adam's first step is about lr · sign(g), which float32 rounding flips where g ≈ 0.
            "optim": {"name": "sgd", "lr": 0.5, "momentum": 0.9, "schedule": "constant"},
            "data": {"batch_size": batch, "num_workers": 0},
            "train": {
                "epochs": 1,
                "out_dir": str(out_dir),
                "device": "cpu",
                "compile": False,
                "bn_group_size": group,
                "log_every_steps": 1,
            },
            "engine": {"strategy": "ddp" if group is None else "single"},
        }
    )


def _fit(out_dir: Path, group: int | None) -> None:
    # Global batch 8 in 2 steps: per rank 2 images (DDP), or 4 groups of 2 on one device.
    Trainer(_config(out_dir, 8, group), ShapesSet(16, seed=0), None, show_progress=False).fit()


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    set_rank_environment(rank, WORLD, port, "reference")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    _fit(Path(out_dir), None)
    dist.destroy_process_group()


def test_one_device_with_groups_matches_four_ddp_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv("E2KD_BACKEND", "reference")
    mp.spawn(_ddp_worker, args=(find_free_port(), str(tmp_path / "ddp")), nprocs=WORLD, join=True)
    _fit(tmp_path / "grouped", 2)
    _fit(tmp_path / "whole", 8)
    ddp = read_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")["model"]
    grouped = read_checkpoint(tmp_path / "grouped" / "checkpoints" / "last.pt")["model"]
    whole = read_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")["model"]
    assert ddp.keys() == grouped.keys() == whole.keys()
    for key in ddp:  # weights and running variances (rank 0's under DDP, group 0's here)
        torch.testing.assert_close(grouped[key].float(), ddp[key].float(), atol=2e-6, rtol=0, msg=key)
    # Without groups the one device computes batch statistics over all 8 and ends elsewhere.
    assert max((whole[k].float() - ddp[k].float()).abs().max().item() for k in ddp) > 1e-3


def test_a_group_size_that_does_not_divide_the_batch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="train.bn_group_size 3 does not divide data.batch_size 8"):
        _config(tmp_path, 8, 3)


def test_the_paper_configs_group_as_their_official_runs():
    configs = Path(__file__).parents[1] / "configs"
    for path in configs.glob("imagenet_*.yaml"):  # full ImageNet: 4 GPUs × 64 officially
        assert load_config(path).train.bn_group_size == 64, path.name
    for path in configs.glob("imagenet*shot_*.yaml"):  # one GPU: the whole batch
        assert load_config(path).train.bn_group_size is None, path.name


@pytest.mark.parametrize("n", [8, 6])  # groups of equal size, and a smaller last batch (unequal groups)
def test_a_grouped_student_step_is_one_graph_and_equals_eager(n):
    """The e²KD step of a B-cos ResNet whose batch norms are grouped, traced whole (fullgraph, aot_eager)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    student = create_model("bcos_resnet20_cifar", num_classes=4).double().train()
    teacher = create_model("bcos_resnet20_cifar", num_classes=4).double().eval().requires_grad_(False)
    set_batch_norm_groups(student, 4)
    x = AddInverse()(torch.rand(n, 3, 8, 8, dtype=torch.float64))

    def loss(images):
        return e2kd_objective(student, teacher, images, lam=1.0, algorithm="sweep")["loss"]

    eager = loss(x)
    (eager_grad,) = torch.autograd.grad(eager, [student.conv1.linear.weight])
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(x)
    (compiled_grad,) = torch.autograd.grad(compiled, [student.conv1.linear.weight])
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=0)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-10, atol=1e-14)
