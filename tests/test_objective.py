"""The e²KD objective: the official gradient (finite differences), its variants and its errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from bcos.modules import BcosConv2d as OfficialConv
from bcos.modules import norms as official_norms
from torch import nn

from e2kd_fast import AddInverse, explanation_mode
from e2kd_fast.distill import TeacherOutputs, e2kd_objective
from e2kd_fast.explain import dynamic_weights, gradcam
from e2kd_fast.nn import BatchNormUncentered2d, BcosConv2d
from e2kd_fast.reference.losses import kd_kl, uniform_off_label_bce
from tests.helpers import randomize_norms


def _bcos_net(width: int, conv=BcosConv2d, norm=BatchNormUncentered2d) -> nn.Sequential:
    return nn.Sequential(
        conv(6, width, 3, padding=1),
        norm(width),
        conv(width, width, 3, stride=2, padding=1),
        norm(width),
        conv(width, 4, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def _pair():
    """A float64 student (train mode) and frozen teacher (eval mode) of small B-cos CNNs."""
    torch.set_default_dtype(torch.float64)
    student = randomize_norms(_bcos_net(5)).train()
    teacher = randomize_norms(_bcos_net(7)).eval().requires_grad_(False)
    x6 = AddInverse()(torch.rand(4, 3, 8, 8))
    return student, teacher, x6


def _loss_value(student, teacher, x6, **kw) -> float:
    return e2kd_objective(student, teacher, x6, **kw)["loss"].item()


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_gradient_equals_finite_differences(tau):
    """The whole objective (KD + λ·explanation) has the exact total derivative."""
    student, teacher, x6 = _pair()
    kw = {"tau": tau, "lam": 2.0}
    e2kd_objective(student, teacher, x6, **kw)["loss"].backward()
    h = 1e-5  # central differences: O(h²) truncation; round-off of the loss (~1e-15) / 2h stays ~5e-11
    for param in (student[0].linear.weight, student[1].weight, student[4].linear.weight):
        for flat in torch.randperm(param.numel())[:3].tolist():
            index = torch.unravel_index(torch.tensor(flat), param.shape)
            with torch.no_grad():
                param[index] += h
            up = _loss_value(student, teacher, x6, **kw)
            with torch.no_grad():
                param[index] -= 2 * h
            down = _loss_value(student, teacher, x6, **kw)
            with torch.no_grad():
                param[index] += h
            assert param.grad[index].item() == pytest.approx((up - down) / (2 * h), rel=1e-6, abs=1e-9)


def test_matches_the_official_recipe_step():
    """Our objective equals the official step: one forward per model in explanation mode, the
    student explanation by create_graph, the final backward outside the mode."""
    student, teacher, x6 = _pair()
    ours = e2kd_objective(student, teacher, x6, lam=1.0)
    ours["loss"].backward()
    ours_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()

    x = x6.clone().requires_grad_(True)
    with explanation_mode(student), explanation_mode(teacher):
        zs, zt = student(x), teacher(x)
        c = zt.argmax(1, keepdim=True)
        (es,) = torch.autograd.grad(zs.gather(1, c).sum(), x, create_graph=True)
        (et,) = torch.autograd.grad(zt.gather(1, c).sum(), x)
    cos = F.cosine_similarity(es.flatten(1), et.detach().flatten(1))
    loss = kd_kl(zs, zt.detach(), 1.0) + (1 - cos).mean()
    loss.backward()
    torch.testing.assert_close(ours["loss"].detach(), loss.detach(), rtol=1e-13, atol=0)
    for a, e in zip(ours_grads, [p.grad for p in student.parameters()], strict=True):
        torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-14)


def test_detach_style_gradient_differs():
    """The v2 detach-style explanation mode truncates the gradient: a regression to it is caught."""
    student, teacher, x6 = _pair()
    e2kd_objective(student, teacher, x6, lam=1.0)["loss"].backward()
    detached = _bcos_net(5, OfficialConv, official_norms.NoBias(official_norms.BatchNormUncentered2d)).train()
    detached.load_state_dict(student.state_dict())
    x = x6.clone().requires_grad_(True)
    zt = teacher(x6)
    c = zt.argmax(1, keepdim=True)
    with explanation_mode(detached):
        zs = detached(x)
        (es,) = torch.autograd.grad(zs.gather(1, c).sum(), x, create_graph=True)
    et = dynamic_weights(teacher, x6, c[:, 0])
    loss = kd_kl(zs, zt, 1.0) + (1 - F.cosine_similarity(es.flatten(1), et.flatten(1))).mean()
    loss.backward()
    ours, truncated = student[0].linear.weight.grad, detached[0].linear.weight.grad
    assert ((ours - truncated).abs().max() / ours.abs().max()).item() > 1e-2


def test_kd_baseline_builds_no_teacher_graph_and_no_explanation():
    student, teacher, x6 = _pair()
    teacher.requires_grad_(True)  # even a teacher whose parameters still require grad
    out = e2kd_objective(student, teacher, x6, lam=0.0)
    assert not out["teacher_logits"].requires_grad
    assert out["exp"].item() == 0 and torch.isnan(out["explanation_cosine"])
    torch.testing.assert_close(out["loss"], kd_kl(student(x6), teacher(x6).detach(), 1.0))


def test_guided_step_interval_skips_the_explanation_term():
    student, teacher, x6 = _pair()
    on = e2kd_objective(student, teacher, x6, step=4, guided_step_interval=2)
    off = e2kd_objective(student, teacher, x6, step=5, guided_step_interval=2)
    assert on["exp"].item() > 0 and off["exp"].item() == 0
    torch.testing.assert_close(off["loss"], off["kd"])


def test_frozen_outputs_equal_live_teacher():
    student, teacher, x6 = _pair()
    live = e2kd_objective(student, teacher, x6)
    live["loss"].backward()
    live_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    weights, logits = dynamic_weights(teacher, x6, None, return_logits=True)
    frozen = e2kd_objective(student, None, x6, frozen=TeacherOutputs(logits.detach(), weights))
    frozen["loss"].backward()
    torch.testing.assert_close(frozen["loss"], live["loss"], rtol=1e-13, atol=0)
    for a, e in zip([p.grad for p in student.parameters()], live_grads, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=0)


def test_ground_truth_term():
    student, teacher, x6 = _pair()
    labels = torch.tensor([0, 1, 2, 3])
    out = e2kd_objective(student, teacher, x6, labels=labels, gt_coef=0.5)
    expected_gt = uniform_off_label_bce(student(x6), labels)
    torch.testing.assert_close(out["gt"], expected_gt)
    torch.testing.assert_close(out["loss"].detach(), 0.5 * expected_gt + out["kd"] + out["exp"])


@pytest.mark.parametrize(("lam", "step"), [(2.0, 0), (2.0, 1), (0.0, 0)])
def test_logit_coef_weighs_the_kd_term_alone(lam, step):
    """β·KD + λ·exp: its value and gradient are the β = 1 terms recombined (explained, KD-only and λ = 0 steps)."""
    student, teacher, x6 = _pair()
    kw = {"lam": lam, "step": step, "guided_step_interval": 2}
    terms = e2kd_objective(student, teacher, x6, **kw)
    # Each term's own gradient from the β = 1 objective: the loss at λ and at λ = 0 (the KD term alone).
    kd_grads = torch.autograd.grad(
        e2kd_objective(student, teacher, x6, **{**kw, "lam": 0.0})["loss"], student.parameters()
    )
    full_grads = torch.autograd.grad(terms["loss"], student.parameters())
    weighted = e2kd_objective(student, teacher, x6, logit_coef=0.5, **kw)
    torch.testing.assert_close(weighted["kd"], terms["kd"], rtol=0, atol=0)
    torch.testing.assert_close(weighted["exp"], terms["exp"], rtol=0, atol=0)
    torch.testing.assert_close(weighted["loss"].detach(), 0.5 * terms["kd"] + lam * terms["exp"], rtol=1e-14, atol=0)
    for got, kd, full in zip(
        torch.autograd.grad(weighted["loss"], student.parameters()), kd_grads, full_grads, strict=True
    ):
        torch.testing.assert_close(got, full - 0.5 * kd, rtol=1e-12, atol=1e-15)


def test_metrics_of_the_objective():
    student, teacher, x6 = _pair()
    out = e2kd_objective(student, teacher, x6)
    assert torch.equal(out["target"], teacher(x6).argmax(1))
    expected = (student(x6).argmax(1) == out["target"]).double().mean()
    assert out["agreement"].item() == pytest.approx(expected.item())
    assert out["explanation_cosine"].item() == pytest.approx(1 - out["exp"].item())


def _standard_pair():
    torch.set_default_dtype(torch.float64)
    student = torchvision.models.resnet18(num_classes=5).train()
    teacher = torchvision.models.resnet18(num_classes=5).eval().requires_grad_(False)
    return student, teacher, torch.randn(2, 3, 64, 64)


def test_gradcam_matches_a_hook_based_implementation():
    _, model, x = _standard_pair()
    store = {}
    handle = model.layer4.register_forward_hook(lambda m, i, o: store.setdefault("a", o))
    with torch.enable_grad():
        xx = x.clone().requires_grad_(True)  # so layer4's output is on a graph
        logits = model(xx)
        (g,) = torch.autograd.grad(logits[:, 2].sum(), store["a"])
    handle.remove()
    cam = F.relu((g.mean((2, 3), keepdim=True) * store["a"]).sum(1, keepdim=True))
    expected = F.interpolate(cam, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(gradcam(model, x, torch.tensor([2, 2])), expected, rtol=1e-12, atol=1e-14)

    densenet = torchvision.models.densenet121(num_classes=5).eval()
    assert gradcam(densenet, x, torch.tensor([0, 1])).shape == (2, 1, 64, 64)
    with pytest.raises(TypeError, match="GradCAM supports torchvision ResNets and DenseNets"):
        gradcam(nn.Linear(3, 2), x)


def test_gradcam_objective_gradient_equals_finite_differences():
    student, teacher, x = _standard_pair()
    student.eval()  # fixed BN statistics keep the finite differences smooth
    out = e2kd_objective(student, teacher, x, explanation="gradcam", lam=3.0)
    out["loss"].backward()
    param, h = student.layer4[1].conv2.weight, 1e-6
    for index in [(0, 0, 1, 1), (3, 2, 0, 2)]:
        with torch.no_grad():
            param[index] += h
        up = e2kd_objective(student, teacher, x, explanation="gradcam", lam=3.0)["loss"].item()
        with torch.no_grad():
            param[index] -= 2 * h
        down = e2kd_objective(student, teacher, x, explanation="gradcam", lam=3.0)["loss"].item()
        with torch.no_grad():
            param[index] += h
        assert param.grad[index].item() == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"explanation": "lrp"}, "explanation must be one of"),
        ({"tau": 0.0}, "need tau > 0"),
        ({"logit_coef": 0.0}, "logit_coef > 0"),
        ({"gt_coef": 1.0}, "needs the ground-truth labels"),
        ({"guided_step_interval": 0}, "guided_step_interval must be >= 1"),
    ],
)
def test_argument_errors(kwargs, message):
    student, teacher, x6 = _pair()
    with pytest.raises(ValueError, match=message):
        e2kd_objective(student, teacher, x6, **kwargs)


def test_frozen_output_errors():
    student, teacher, x6 = _pair()
    with pytest.raises(ValueError, match="needs a teacher model or its frozen outputs"):
        e2kd_objective(student, None, x6)
    logits = teacher(x6)
    with pytest.raises(ValueError, match="hold no explanation"):
        e2kd_objective(student, None, x6, frozen=TeacherOutputs(logits))
    with pytest.raises(ValueError, match="differ in shape"):
        e2kd_objective(student, None, x6, frozen=TeacherOutputs(logits, torch.zeros(4, 6, 4, 4)))
    with pytest.raises(ValueError, match="cover 2 samples, the batch has 4"):
        e2kd_objective(student, None, x6, frozen=TeacherOutputs(logits[:2], None), lam=0.0)
