"""Activation checkpointing of student stages: exact gradients and buffers, less saved memory, one graph."""

from __future__ import annotations

import copy

import pytest
import torch

from e2kd_fast.distill import e2kd_objective
from e2kd_fast.models import create_model
from e2kd_fast.nn.activation_checkpointing import enable_activation_checkpointing, stage_names


def _pair(name: str = "bcos_resnet20_cifar"):
    student = create_model(name, num_classes=5)
    teacher = create_model("bcos_resnet20_cifar", num_classes=5).eval().requires_grad_(False)
    checkpointed = copy.deepcopy(student)
    enable_activation_checkpointing(checkpointed)
    return student, checkpointed, teacher


def _step(student, teacher, x, lam: float):
    saved_bytes = 0

    def pack(t):
        nonlocal saved_bytes
        saved_bytes += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = e2kd_objective(student, teacher, x, lam=lam, algorithm="sweep")["loss"]
    loss.backward()
    grads = [p.grad for p in student.parameters()]
    return loss.detach(), grads, [b.clone() for b in student.buffers()], saved_bytes


def test_stage_names_of_the_zoo():
    assert stage_names(create_model("bcos_resnet20_cifar", num_classes=5)) == ["layer1", "layer2", "layer3"]
    assert stage_names(create_model("resnet18", num_classes=5)) == ["layer1", "layer2", "layer3", "layer4"]
    names = stage_names(create_model("bcos_densenet121", num_classes=5))
    assert names[:2] == ["features.denseblock1", "features.transition1"] and len(names) == 7
    vit = create_model("bcos_vit_ti_patch16_224", num_classes=5)
    assert stage_names(vit) == [f"transformer.encoder_{i}" for i in range(12)]
    with pytest.raises(ValueError, match="found no stages in Linear"):
        enable_activation_checkpointing(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("lam", [0.0, 2.0], ids=["kd", "e2kd"])
def test_checkpointed_step_is_exact_and_saves_less(lam):
    student, checkpointed, teacher = _pair()
    x = torch.rand(4, 6, 16, 16)
    loss, grads, buffers, saved = _step(student, teacher, x, lam)
    loss_c, grads_c, buffers_c, saved_c = _step(checkpointed, teacher, x, lam)
    assert torch.equal(loss, loss_c)
    for g, g_c in zip(grads, grads_c, strict=True):
        torch.testing.assert_close(g_c, g, rtol=0, atol=0)
    for b, b_c in zip(buffers, buffers_c, strict=True):  # running statistics are updated once, not twice
        assert torch.equal(b, b_c)
    assert saved_c < 0.75 * saved


def test_checkpointed_step_compiles_to_one_graph():
    _, checkpointed, teacher = _pair()
    x = torch.rand(2, 6, 16, 16)
    explanation = torch._dynamo.explain(lambda x: e2kd_objective(checkpointed, teacher, x, algorithm="sweep")["loss"])(
        x
    )
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
