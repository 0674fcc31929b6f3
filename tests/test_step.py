"""The compiled e²KD step: one graph without breaks for every config pair, equal to eager."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from e2kd_fast import AddInverse, create_model
from e2kd_fast.distill import TeacherOutputs
from e2kd_fast.engine.step import TrainStep
from e2kd_fast.explain import dynamic_weights
from tests.helpers import randomize_norms
from tests.test_trainer import _tiny_bcos

# The student ← teacher pairs of configs/ (teachers with few classes and tiny inputs keep this cheap).
PAIRS = [
    ("bcos_resnet18", "bcos_densenet169", "bcos"),
    ("bcos_resnet18", "bcos_resnet34", "bcos"),
    ("bcos_vit_ti_patch16_224", "bcos_densenet169", "bcos"),
    ("resnet18", "resnet34", "gradcam"),
]


@pytest.mark.parametrize(("student", "teacher", "explanation"), PAIRS, ids=[f"{s}<-{t}" for s, t, _ in PAIRS])
def test_teacher_and_student_graphs_have_no_breaks(student, teacher, explanation):
    """The live teacher's inference graph and the student's forward-to-loss graph are one graph each."""
    torch._dynamo.reset()
    s = create_model(student, num_classes=5).train()
    t = create_model(teacher, num_classes=5).eval().requires_grad_(False)
    x = torch.rand(2, 6 if explanation == "bcos" else 3, 32, 32)
    step = TrainStep(s, t, explanation=explanation)
    teacher_graph, student_graph = step._teacher_graph(explain=True), step._student_graph(explain=True)
    report = torch._dynamo.explain(teacher_graph)(x)
    assert (report.graph_count, report.graph_break_count) == (1, 0), report.break_reasons
    outputs = teacher_graph(x)
    report = torch._dynamo.explain(student_graph)(x, None, outputs)
    assert (report.graph_count, report.graph_break_count) == (1, 0), report.break_reasons


def test_compiled_step_equals_eager_and_has_the_exact_gradient():
    """float32: compiled and eager steps agree; float64: the compiled gradient matches finite differences."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    student, teacher = _tiny_bcos(2).train(), _tiny_bcos(1).eval().requires_grad_(False)
    x6 = AddInverse()(torch.rand(4, 3, 8, 8))
    eager, compiled = TrainStep(student, teacher, lam=2.0), TrainStep(student, teacher, lam=2.0, compile=True)
    lines = []
    compiled.log = lines.append
    grads = []
    for step in (eager, compiled):
        out = step(x6, None, 0)
        out["loss"].backward()
        grads.append([p.grad.clone() for p in student.parameters()])
        student.zero_grad()
    torch.testing.assert_close(compiled(x6, None, 0)["loss"], eager(x6, None, 0)["loss"], rtol=1e-5, atol=1e-6)
    for a, e in zip(*grads, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)
    graphs = [line.split(" in ")[0] for line in lines]
    assert graphs == ["compiled the teacher e2kd graph", "compiled the student e2kd graph"]
    # Steps without the explanation term (guided_step_interval) use a second graph, not a recompile.
    guided = TrainStep(student, teacher, lam=2.0, guided_step_interval=2, compile=True, log=lines.append)
    kd_only = guided(x6, None, 1)
    assert kd_only["exp"].item() == 0 and "student kd graph" in lines[-1]
    # The KD graph's loss keeps its gradient (a zero-weighted constant term once lost it under Inductor).
    kd_only["loss"].backward()
    kd_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    eager_kd = TrainStep(student, teacher, lam=2.0, guided_step_interval=2)(x6, None, 1)
    eager_kd["loss"].backward()
    for a, e in zip(kd_grads, [p.grad for p in student.parameters()], strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


def test_compiled_float64_step_matches_finite_differences():
    torch._dynamo.reset()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    student, teacher = randomize_norms(_tiny_bcos(2)).double().train(), _tiny_bcos(1).double().eval()
    teacher.requires_grad_(False)
    x6 = AddInverse()(torch.rand(3, 3, 8, 8))
    weights, logits = dynamic_weights(teacher, x6, None, return_logits=True)
    frozen = TeacherOutputs(logits, weights)
    step = TrainStep(student, None, lam=2.0, compile=True, log=lambda _: None)
    step(x6, None, 0, frozen)["loss"].backward()
    param, index, h = student[2].linear.weight, (3, 1, 1, 0), 1e-6
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            param[index] += sign * h
        values.append(step(x6, None, 0, frozen)["loss"].item())
        with torch.no_grad():
            param[index] -= sign * h
    assert param.grad[index].item() == pytest.approx((values[0] - values[1]) / (2 * h), rel=1e-6, abs=1e-9)


def test_guided_step_counter_counts_the_step_in_its_epoch_or_in_the_run():
    # Official (GTE distillation_trainstep): explain when batch_idx % K == 0, batch_idx counting from 0 in each
    # epoch; with 3 steps per epoch and K = 2 that is steps 0, 2 | 3, 5 | 6, 8 of the run.
    from e2kd_fast.config import config_from_dict
    from e2kd_fast.engine.step import make_train_step

    student = teacher = torch.nn.Identity()
    per_epoch = TrainStep(student, teacher, guided_step_interval=2, guided_step_counter="epoch", steps_per_epoch=3)
    assert [s for s in range(9) if per_epoch.explains_at(s)] == [0, 2, 3, 5, 6, 8]
    per_run = TrainStep(student, teacher, guided_step_interval=2, guided_step_counter="run", steps_per_epoch=3)
    assert [s for s in range(9) if per_run.explains_at(s)] == [0, 2, 4, 6, 8]
    assert not TrainStep(student, teacher, lam=0.0, guided_step_counter="epoch").explains_at(0)
    with pytest.raises(ValueError, match="guided_step_counter must be 'run' or 'epoch'; got 'batch'"):
        TrainStep(student, teacher, guided_step_counter="batch")
    cfg = config_from_dict(
        {
            "student": {"name": "bcos_resnet18"},
            "teacher": {"name": "bcos_resnet34"},
            "distill": {"guided_step_interval": 2, "guided_step_counter": "epoch"},
        }
    )
    step = make_train_step(student, teacher, cfg, steps_per_epoch=3)
    assert (step.guided_step_counter, step.guided_step_interval, step.steps_per_epoch) == ("epoch", 2, 3)


def test_cpu_graphs_compile_without_inductor_layout_optimisation(monkeypatch):
    """On the CPU the conv weights keep their layout (bench/NOTES.md); elsewhere Inductor decides."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(kwargs) or fn)
    step = TrainStep(torch.nn.Identity(), None, compile=True)
    step._compiled(lambda x: x, "cpu")
    step._compiled(lambda x: x, "cuda")
    assert calls == [
        {"fullgraph": True, "options": {"layout_optimization": False}},
        {"fullgraph": True, "options": None},
    ]


def test_teacher_cuda_graph_needs_compile_and_cuda_images():
    student, teacher = _tiny_bcos(2).train(), _tiny_bcos(1).eval().requires_grad_(False)
    with pytest.raises(ValueError, match="needs compile=True"):
        TrainStep(student, teacher, teacher_cuda_graph=True)
    step = TrainStep(student, teacher, compile=True, teacher_cuda_graph=True, log=lambda _: None)
    with pytest.raises(ValueError, match="needs CUDA images; got cpu ones"):
        step(AddInverse()(torch.rand(2, 3, 8, 8)), None, 0)


@pytest.mark.requires_cuda
def test_teacher_replayed_as_a_cuda_graph_equals_the_compiled_teacher():
    """Fresh images every call: the graph reads each batch (copied in), and its outputs are clones."""
    torch._dynamo.reset()
    student = _tiny_bcos(2).cuda().train()
    teacher = _tiny_bcos(1).cuda().eval().requires_grad_(False)
    plain = TrainStep(student, teacher, lam=2.0, compile=True, log=lambda _: None)
    graphed = TrainStep(student, teacher, lam=2.0, compile=True, log=lambda _: None, teacher_cuda_graph=True)
    kept = []
    for _ in range(4):  # compile, record, replay, replay
        x6 = AddInverse()(torch.rand(4, 3, 8, 8, device="cuda"))
        got_loss, want_loss = graphed(x6, None, 0)["loss"], plain(x6, None, 0)["loss"]
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-7)
        outputs = graphed._fns[("teacher", True)][0](x6)
        want = plain._fns[("teacher", True)][0](x6)
        torch.testing.assert_close(outputs.logits, want.logits, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(outputs.explanation, want.explanation, rtol=1e-6, atol=1e-7)
        kept.append((x6, outputs))
    for x6, outputs in kept:  # earlier outputs survive later replays
        torch.testing.assert_close(outputs.logits, plain._fns[("teacher", True)][0](x6).logits, rtol=1e-6, atol=1e-7)
