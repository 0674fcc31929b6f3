"""The explicit explanation sweep against the autograd reference, and its gradient semantics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from e2kd_fast import AddInverse, create_model, dynamic_weights, list_models
from e2kd_fast.distill import e2kd_objective
from e2kd_fast.explain import sweep
from e2kd_fast.explain.sweep import dynamic_weights_sweep
from e2kd_fast.models.bcos_densenet import BcosDenseNet
from e2kd_fast.nn import BcosConv2d, BcosLinear, set_batch_norm_groups
from e2kd_fast.reference import bcos as reference_bcos
from tests.helpers import randomize_norms, rel_err
from tests.test_objective import _pair


def _compare(model: nn.Module, side: int, training: bool, seed: int = 0) -> None:
    model = randomize_norms(model).train(training)
    x6 = AddInverse()(torch.rand(2, 3, side, side))
    target = torch.tensor([1, 3])
    torch.manual_seed(seed)  # identical randomness (drop-path) in both forwards
    reference, ref_logits = dynamic_weights(model, x6, target, return_logits=True)
    torch.manual_seed(seed)
    swept, logits = dynamic_weights(model, x6, target, algorithm="sweep", return_logits=True)
    assert rel_err(logits, ref_logits) < 1e-12
    assert rel_err(swept, reference) < 1e-10


@pytest.mark.parametrize("name", list_models(family="bcos"))
def test_sweep_equals_autograd_for_every_architecture(name):
    torch.set_default_dtype(torch.float64)
    _compare(create_model(name), 16 if "cifar" in name else 32, training=False)


@pytest.mark.parametrize(
    "name", ["bcos_resnet18", "bcos_densenet121", "bcos_vit_ti_patch16_224", "bcos_resnet20_cifar"]
)
def test_sweep_equals_autograd_in_train_mode(name):
    """Students train in train mode: batch statistics are dynamic weights too."""
    torch.set_default_dtype(torch.float64)
    _compare(create_model(name), 16 if "cifar" in name else 32, training=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"norm": "none", "max_out": 2},  # the official CIFAR-10 configuration
        {"b": 2.5},
        {"b": 1},
        {"norm": "pn"},
        {"norm": "ln"},
        {"norm": "gn4"},
    ],
    ids=["maxout", "b2.5", "b1", "position-norm", "layer-norm", "group-norm"],
)
def test_sweep_handles_every_layer_option(kwargs):
    torch.set_default_dtype(torch.float64)
    _compare(create_model("bcos_resnet20_cifar", **kwargs), 16, training=True)


def test_sweep_with_stochastic_depth():
    torch.set_default_dtype(torch.float64)
    _compare(create_model("bcos_resnet18", num_classes=10, stochastic_depth_prob=0.3), 32, training=True, seed=5)


def test_teacher_sweep_builds_no_graph():
    torch.set_default_dtype(torch.float64)
    teacher = create_model("bcos_resnet20_cifar").eval().requires_grad_(False)
    weights, logits = dynamic_weights(teacher, torch.rand(2, 6, 16, 16), None, algorithm="sweep", return_logits=True)
    assert weights.grad_fn is None and logits.grad_fn is None
    student = create_model("bcos_resnet20_cifar")
    assert dynamic_weights(student, torch.rand(2, 6, 16, 16), algorithm="sweep", create_graph=False).grad_fn is None
    assert dynamic_weights(student, torch.rand(2, 6, 16, 16), algorithm="sweep").grad_fn is not None


@pytest.mark.parametrize("name", ["bcos_densenet121", "bcos_vit_ti_patch16_224"])
def test_each_layer_weight_is_normalised_once_per_sweep(name, monkeypatch):
    """The adjoint applies the ŵ its forward recorded (normalised again, it fused into the kernel of
    the adjoint's scale and made that kernel one per layer instead of one per block shape)."""
    model = create_model(name, num_classes=4).eval().requires_grad_(False)
    normalised, unit_norm_weight = [], reference_bcos.unit_norm_weight
    for module in (sweep, reference_bcos):
        monkeypatch.setattr(module, "unit_norm_weight", lambda w: normalised.append(w) or unit_norm_weight(w))
    dynamic_weights_sweep(model, AddInverse()(torch.rand(1, 3, 32, 32)))
    layers = [m for m in model.modules() if isinstance(m, (BcosConv2d, BcosLinear))]
    assert len(normalised) == len(layers)
    assert {id(w) for w in normalised} == {id(m.linear.weight) for m in layers}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_pointwise_conv_adjoint_adds_onto_a_channel_slice(channels_last):
    """The dense layers' folded head adjoint equals the reference's 1×1 conv adjoint, scaled per input
    channel and added onto a channel slice of the block's gradient, in the gradient's memory format."""
    torch.set_default_dtype(torch.float64)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.randn(3, 5, 4, 6).contiguous(memory_format=layout)
    base = torch.randn(3, 9, 4, 6).contiguous(memory_format=layout)[:, 2:]  # R = 7 channels, strided
    w_hat, factor = torch.randn(5, 7, 1, 1), torch.rand(7)
    out = sweep._add_pointwise_conv_adjoint(base, g, (w_hat.flatten(1) * factor).t())
    expected = base + factor[:, None, None] * reference_bcos.conv_adjoint(g, w_hat, base.shape[-2:])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert out.is_contiguous(memory_format=layout)


def test_dense_heads_fold_for_batch_norms_outside_autocast():
    """The folded head adjoint is taken where its records allow it, and not under autocast (where the
    block's gradient would accumulate in the low precision); the sweep equals autograd either way
    (the architecture tests above run it folded)."""
    torch.set_default_dtype(torch.float64)
    block = create_model("bcos_densenet121", num_classes=4).features.denseblock1
    assert sweep._folds_heads(block, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not sweep._folds_heads(block, "cpu")
    position_norm = create_model("bcos_densenet121", num_classes=4, norm="pn")
    assert not sweep._folds_heads(position_norm.features.denseblock1, "cpu")
    _compare(position_norm, 32, training=False)  # the unfolded adjoint
    grouped = create_model("bcos_densenet121", num_classes=4).train()
    set_batch_norm_groups(grouped, 2)  # per-image norm scales in training: unfolded
    assert not sweep._folds_heads(grouped.features.denseblock1, "cpu")
    _compare(grouped, 32, training=True)
    empty = BcosDenseNet(8, (1, 0), 16, num_classes=4, small_inputs=True)  # a block without layers
    assert not sweep._folds_heads(empty.features.denseblock2, "cpu")
    _compare(empty, 16, training=False)


def test_objective_gradient_through_the_sweep():
    """Same loss and gradient as the autograd reference, and equal to finite differences."""
    student, teacher, x6 = _pair()
    reference = e2kd_objective(student, teacher, x6, lam=2.0)
    reference["loss"].backward()
    expected = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    swept = e2kd_objective(student, teacher, x6, lam=2.0, algorithm="sweep")
    swept["loss"].backward()
    torch.testing.assert_close(swept["loss"], reference["loss"], rtol=1e-12, atol=0)
    for a, e in zip([p.grad for p in student.parameters()], expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-13)

    param, index, h = student[2].linear.weight, (1, 2, 0, 1), 1e-6
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            param[index] += sign * h
        values.append(e2kd_objective(student, teacher, x6, lam=2.0, algorithm="sweep")["loss"].item())
        with torch.no_grad():
            param[index] -= sign * h
    assert param.grad[index].item() == pytest.approx((values[0] - values[1]) / (2 * h), rel=1e-6, abs=1e-9)


def test_unsupported_modules_are_named():
    model = nn.Sequential(nn.Conv2d(6, 4, 3), nn.Flatten())
    with pytest.raises(NotImplementedError, match="no adjoint for Conv2d"):
        dynamic_weights_sweep(model, torch.rand(1, 6, 8, 8), torch.tensor([0]))
