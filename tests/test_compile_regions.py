"""The sweep's repeated blocks as nested compile regions: reused per distinct shape, equal to eager.

Traced with Dynamo and AOTAutograd only (``aot_eager``): the regions are a tracing matter, and
Inductor's compile of the same graphs is covered by tests/test_compiled_pairs.py.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch._dynamo
from torch import nn

from e2kd_fast.engine.step import TrainStep
from e2kd_fast.explain import sweep
from e2kd_fast.models.bcos_densenet import BcosDenseNet, DenseBlock
from e2kd_fast.models.bcos_resnet import BasicBlock, BcosResNet
from e2kd_fast.models.bcos_vit import BcosViT
from e2kd_fast.nn.activation_checkpointing import enable_activation_checkpointing
from tests.helpers import randomize_norms

pytestmark = pytest.mark.skipif(not sweep._regions_supported, reason="this torch has no adjustable region reuse")

MODELS = {
    # Three blocks in the first stage: two of them alike; one per later stage.
    "resnet": lambda: BcosResNet(BasicBlock, [3, 1, 1, 1], 3, inplanes=8),
    "densenet": lambda: BcosDenseNet(4, (3, 2, 1, 1), 8, num_classes=3),
    "vit": lambda: BcosViT(8, 24, 3, 2, 48, num_classes=3),
}


def _graphs(fn, *args) -> tuple[list[torch.fx.GraphModule], Any]:
    """The FX graphs Dynamo hands to the backend for ``fn(*args)``; runs it through AOTAutograd."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        from torch._dynamo.backends.common import aot_autograd

        return aot_autograd(fw_compiler=lambda g, _: g, bw_compiler=lambda g, _: g)(gm, example_inputs)

    out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return graphs, out


def _region_calls(gm: torch.fx.GraphModule) -> tuple[int, int]:
    """(invoke_subgraph calls, distinct subgraphs) in a Dynamo graph."""
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and "invoke_subgraph" in str(n.target)]
    return len(calls), len({n.args[0].target for n in calls})


def _student_step(student: nn.Module, x: torch.Tensor, outputs):
    step = TrainStep(student, None, tau=2.0, lam=5.0, log=lambda _: None)
    return step._student_graph(explain=True)(x, None, outputs)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
def test_regions_are_reused_and_the_step_equals_eager(name, checkpointed):
    torch._dynamo.reset()
    torch.manual_seed(0)
    teacher = randomize_norms(MODELS[name]()).double().eval().requires_grad_(False)
    student = randomize_norms(MODELS[name]()).double().train()
    if checkpointed:
        enable_activation_checkpointing(student)
    x = torch.rand(3, 6, 32, 32, dtype=torch.float64)
    outputs = TrainStep(student, teacher)._teacher_graph(explain=True)(x)

    eager_student = copy.deepcopy(student)
    eager = _student_step(eager_student, x, outputs)
    eager["loss"].backward()
    graphs, compiled = _graphs(lambda x: _student_step(student, x, outputs), x)
    compiled["loss"].backward()

    assert len(graphs) == 1
    calls, distinct = _region_calls(graphs[0])
    if name == "vit":  # layer norms only: the blocks are regions in training too
        assert calls > distinct > 0, f"{calls} region calls, {distinct} distinct"
    else:  # training batch norms update their buffers: inlined
        assert calls == 0
    torch.testing.assert_close(compiled["loss"], eager["loss"], rtol=1e-10, atol=1e-12)
    for (pname, p), q in zip(student.named_parameters(), eager_student.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-12, msg=pname)
    # Batch-norm running statistics are updated as eagerly (those blocks are inlined in training).
    for b, c in zip(student.buffers(), eager_student.buffers(), strict=True):
        torch.testing.assert_close(b, c, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", MODELS)
def test_teacher_graph_uses_regions_and_matches_eager(name):
    torch._dynamo.reset()
    torch.manual_seed(1)
    teacher = randomize_norms(MODELS[name]()).double().eval().requires_grad_(False)
    x = torch.rand(2, 6, 32, 32, dtype=torch.float64)
    teacher_forward = TrainStep(teacher, teacher)._teacher_graph(explain=True)
    graphs, compiled = _graphs(teacher_forward, x)
    eager = teacher_forward(x)
    calls, distinct = _region_calls(graphs[0])
    assert calls > distinct > 0, f"{calls} region calls, {distinct} distinct"
    torch.testing.assert_close(compiled.logits, eager.logits, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(compiled.explanation, eager.explanation, rtol=1e-10, atol=1e-14)


def test_every_dense_block_traces_one_forward_and_one_adjoint_region():
    """The adjoint's input is a channel slice of the block's gradient, a view whose strides differ
    from layer to layer; copied dense, every layer tail of a block reuses the same two regions."""
    torch._dynamo.reset()
    teacher = MODELS["densenet"]().double().eval().requires_grad_(False)
    x = torch.rand(2, 6, 32, 32, dtype=torch.float64)
    graphs, _ = _graphs(lambda x: sweep.dynamic_weights_sweep(teacher, x), x)
    # A region called once is inlined: the blocks of one layer have none.
    blocks = [len(b) for b in teacher.modules() if isinstance(b, DenseBlock) and len(b) > 1]
    assert _region_calls(graphs[0]) == (2 * sum(blocks), 2 * len(blocks))


@pytest.mark.parametrize("name", ["resnet", "densenet"])
def test_a_stride_one_block_records_tensors_alone(name):
    """Dynamo reuses a traced region without tracing it again only when the region returns tensors
    alone: the records of a block without strides, MaxOut or active stochastic depth are its
    scales, with no sizes or placeholders."""
    model = MODELS[name]().double().eval().requires_grad_(False)
    if name == "resnet":
        block, forward, channels = model.layer1[1], sweep.taped_forward, 8
    else:  # a dense layer's tail: norm2 and the 3×3 conv
        block = next(iter(model.features.denseblock1.values()))
        forward, channels = sweep._dense_tail_fwd, block.norm2.num_features
    tape: list = []
    forward(block, torch.rand(2, channels, 8, 8, dtype=torch.float64), tape)
    assert len(tape) == 1 and tape[0] and all(isinstance(r, torch.Tensor) for r in tape[0])


def test_regions_can_be_turned_off(monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(sweep, "compile_regions", False)
    torch.manual_seed(2)
    model = MODELS["resnet"]().double().eval().requires_grad_(False)
    x = torch.rand(2, 6, 32, 32, dtype=torch.float64)
    graphs, _ = _graphs(lambda x: sweep.dynamic_weights_sweep(model, x), x)
    assert _region_calls(graphs[0]) == (0, 0)
