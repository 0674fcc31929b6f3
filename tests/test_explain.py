"""Explanations: the official e²KD gradient semantics, argument checks, contribution maps, pictures."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bcos.common import gradient_to_image as official_gradient_to_image
from bcos.modules import BcosConv2d as OfficialConv
from bcos.modules import norms as official_norms
from torch import nn

from e2kd_fast import AddInverse, create_model, dynamic_weights, explanation_mode, explanation_to_rgba
from e2kd_fast.nn import BatchNormUncentered2d, BcosConv2d
from tests.helpers import randomize_norms


def _small_net(conv=BcosConv2d, norm=BatchNormUncentered2d) -> nn.Sequential:
    """A tiny B-cos CNN with a batch-statistics norm: every kind of dynamic weight in a few layers."""
    return nn.Sequential(
        conv(6, 5, 3, padding=1),
        norm(5),
        conv(5, 4, 3, stride=2, padding=1),
        conv(4, 3, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def _setup():
    torch.set_default_dtype(torch.float64)
    net = randomize_norms(_small_net()).train()
    x6 = AddInverse()(torch.rand(3, 3, 6, 6))
    target = torch.tensor([0, 2, 1])
    teacher_map = torch.randn(3, 6, 6, 6)
    return net, x6, target, teacher_map


def _explanation_loss(weights: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    return (1 - F.cosine_similarity(weights.flatten(1), teacher_map.flatten(1))).mean()


def _finite_difference(net, x6, target, teacher_map, param, index, h=1e-6) -> float:
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            param[index] += sign * h
        values.append(_explanation_loss(dynamic_weights(net, x6, target, create_graph=False), teacher_map).item())
        with torch.no_grad():
            param[index] -= sign * h
    return (values[0] - values[1]) / (2 * h)


def test_explanation_gradient_is_the_exact_total_derivative():
    """∂L_exp/∂θ through the dynamic scales equals central finite differences (official e²KD)."""
    net, x6, target, teacher_map = _setup()
    loss = _explanation_loss(dynamic_weights(net, x6, target), teacher_map)
    loss.backward()
    checked = 0
    for param in (net[0].linear.weight, net[1].weight, net[2].linear.weight):
        for flat in torch.randperm(param.numel())[:3].tolist():
            index = torch.unravel_index(torch.tensor(flat), param.shape)
            expected = _finite_difference(net, x6, target, teacher_map, param, index)
            assert param.grad[index].item() == pytest.approx(expected, rel=1e-6, abs=1e-9)
            checked += 1
    assert checked == 9


def test_detach_style_gradient_is_truncated_and_differs():
    """The v2 explanation mode (detach) gives a different, truncated gradient: what we must not do."""
    net, x6, target, teacher_map = _setup()
    official = _small_net(OfficialConv, official_norms.NoBias(official_norms.BatchNormUncentered2d)).train()
    official.load_state_dict(net.state_dict())
    x = x6.clone().requires_grad_(True)
    with explanation_mode(official):
        out = official(x).gather(1, target[:, None]).sum()
        (weights_detached,) = torch.autograd.grad(out, x, create_graph=True)
    _explanation_loss(weights_detached, teacher_map).backward()

    _explanation_loss(dynamic_weights(net, x6, target), teacher_map).backward()
    ours, truncated = net[0].linear.weight.grad, official[0].linear.weight.grad
    assert ((ours - truncated).abs().max() / ours.abs().max()).item() > 1e-2


def test_kd_gradient_unchanged_by_forward_in_explanation_mode():
    """Logits from the explanation forward give exactly the ordinary gradient (the flag is read at backward)."""
    net, x6, target, teacher_map = _setup()
    teacher_probs = torch.softmax(torch.randn(3, 3), dim=1)

    def kd(logits):
        return F.kl_div(logits.log_softmax(1), teacher_probs, reduction="batchmean")

    kd(net(x6)).backward()
    plain = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net[1].running_var.copy_(torch.ones_like(net[1].running_var))  # stats do not affect train-mode grads
    _, logits = dynamic_weights(net, x6, target, return_logits=True)
    kd(logits).backward()
    for a, e in zip([p.grad for p in net.parameters()], plain, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-13, atol=0)


def test_create_graph_defaults_follow_trainability():
    torch.set_default_dtype(torch.float64)
    net = _small_net().eval()
    x6 = AddInverse()(torch.rand(2, 3, 6, 6))
    target = torch.tensor([0, 1])
    assert dynamic_weights(net, x6, target).requires_grad  # a student: W stays differentiable
    net.requires_grad_(False)
    assert not dynamic_weights(net, x6, target).requires_grad  # a frozen teacher: no graph
    net.requires_grad_(True)
    with torch.no_grad():
        weights = dynamic_weights(net, x6, target)  # works under no_grad, builds no graph
    assert not weights.requires_grad and weights.abs().sum() > 0


def test_argument_errors():
    net = _small_net()
    x6 = torch.rand(2, 6, 6, 6)
    with pytest.raises(ValueError, match="1-d tensor of 2 class indices"):
        dynamic_weights(net, x6, torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match="integer class indices"):
        dynamic_weights(net, x6, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        dynamic_weights(net, x6, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="unknown dynamic_weights algorithm 'lrp'; available: autograd, sweep"):
        dynamic_weights(net, x6, torch.tensor([0, 1]), algorithm="lrp")
    with torch.inference_mode(), pytest.raises(RuntimeError, match="outside torch.inference_mode"):
        dynamic_weights(net, x6, torch.tensor([0, 1]))


def test_explanation_mode_restores_state_when_nested_and_on_error():
    net = _small_net()
    with explanation_mode(net):
        assert all(m.explaining for m in net if hasattr(m, "explaining"))
        with explanation_mode(net, active=False):
            assert not net[0].explaining
        assert net[0].explaining
    assert not net[0].explaining
    with pytest.raises(ZeroDivisionError), explanation_mode(net):
        raise ZeroDivisionError
    assert not net[0].explaining


def test_explanation_mode_switches_official_modules_too():
    official = _small_net(OfficialConv, official_norms.NoBias(official_norms.BatchNormUncentered2d))
    with explanation_mode(official):
        assert official[0].detach
    assert not official[0].detach


@pytest.mark.parametrize("smooth", [0, 15])
def test_rgba_matches_official_picture(smooth):
    torch.set_default_dtype(torch.float64)
    model = create_model("bcos_resnet20_cifar").eval()
    x6 = AddInverse()(torch.rand(2, 3, 32, 32))
    weights = dynamic_weights(model, x6, torch.tensor([1, 2]))
    pictures = explanation_to_rgba(x6, weights, smooth=smooth)
    assert pictures.shape == (2, 32, 32, 4)
    assert pictures.min() >= 0 and pictures.max() <= 1
    for i in range(2):
        expected = official_gradient_to_image(x6[i], weights[i], smooth=smooth, alpha_percentile=99.5)
        assert abs(pictures[i] - expected).max() < 1e-12


def test_rgba_rejects_wrong_shapes():
    with pytest.raises(ValueError, match=r"\[6, H, W\]"):
        explanation_to_rgba(torch.rand(3, 8, 8), torch.rand(3, 8, 8))
