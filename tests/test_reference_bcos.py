"""The B-cos layer maths: reference functions, modules, and the official `bcos` layers as oracle."""

from __future__ import annotations

import pytest
import torch
from bcos.modules import BcosConv2d as OfficialConv
from bcos.modules import BcosLinear as OfficialLinear

from e2kd_fast.nn import BcosConv2d, BcosLinear, explanation_mode
from e2kd_fast.reference import bcos_conv2d, bcos_linear, patch_norm, patch_norm_slow
from tests.helpers import rel_err

GEOMETRIES = [  # (C_in, C_out, kernel, stride, padding, groups)
    (6, 4, 1, 1, 0, 1),
    (6, 8, 3, 1, 1, 1),
    (6, 8, 7, 2, 3, 1),
    (8, 8, 3, 2, 1, 2),
    (8, 12, 3, 1, 1, 4),
    (5, 3, 2, 2, 0, 1),
]


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_patch_norm_matches_ones_kernel_conv(geometry):
    c_in, c_out, k, s, p, g = geometry
    x = torch.randn(2, c_in, 11, 9, dtype=torch.float64)
    fast = patch_norm(x, k, s, p, g, c_out)
    slow = patch_norm_slow(x, (c_out, c_in // g, k, k), s, p, 1, g)
    torch.testing.assert_close(fast.expand_as(slow), slow, rtol=1e-12, atol=0)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize(("b", "max_out"), [(2, 1), (1, 1), (2.5, 1), (2, 2), (1.5, 3)])
def test_conv_matches_official(geometry, b, max_out):
    c_in, c_out, k, s, p, g = geometry
    ours = BcosConv2d(c_in, c_out, k, stride=s, padding=p, groups=g, b=b, max_out=max_out).double()
    official = OfficialConv(c_in, c_out, k, stride=s, padding=p, groups=g, b=b, max_out=max_out).double()
    official.load_state_dict(ours.state_dict())
    x = torch.randn(3, c_in, 10, 10, dtype=torch.float64, requires_grad=True)
    y_ours, y_official = ours(x), official(x)
    assert rel_err(y_ours, y_official) < 1e-13
    g_ours = torch.autograd.grad(y_ours.square().sum(), [x, ours.linear.weight])
    g_official = torch.autograd.grad(y_official.square().sum(), [x, official.linear.weight])
    for a, e in zip(g_ours, g_official, strict=True):
        assert rel_err(a, e) < 1e-12


@pytest.mark.parametrize(("b", "max_out"), [(2, 1), (1, 1), (2.5, 1), (2, 2)])
def test_linear_matches_official(b, max_out):
    ours = BcosLinear(7, 5, b=b, max_out=max_out).double()
    official = OfficialLinear(7, 5, b=b, max_out=max_out).double()
    official.load_state_dict(ours.state_dict())
    x = torch.randn(4, 3, 7, dtype=torch.float64)
    assert rel_err(ours(x), official(x)) < 1e-13


def test_dilated_conv_uses_exact_patch_norm():
    x = torch.randn(2, 4, 12, 12, dtype=torch.float64)
    ours = BcosConv2d(4, 6, 3, padding=2, dilation=2).double()
    official = OfficialConv(4, 6, 3, padding=2, dilation=2).double()
    official.load_state_dict(ours.state_dict())
    assert rel_err(ours(x), official(x)) < 1e-13


@pytest.mark.parametrize(("b", "max_out", "groups"), [(2, 1, 1), (2.5, 1, 2), (2, 2, 1)])
def test_conv_reference_is_twice_differentiable(b, max_out, groups):
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4 * max_out, 4 // groups, 3, 3, dtype=torch.float64, requires_grad=True)

    def f(x, w):
        return bcos_conv2d(x, w, b, max_out, stride=2, padding=1, groups=groups)

    assert torch.autograd.gradcheck(f, (x, w))
    assert torch.autograd.gradgradcheck(f, (x, w))


@pytest.mark.parametrize("b", [2, 1.5])
def test_linear_reference_is_twice_differentiable(b):
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: bcos_linear(x, w, b), (x, w))
    assert torch.autograd.gradgradcheck(lambda x, w: bcos_linear(x, w, b), (x, w))


def test_explanation_mode_output_equals_normal_output():
    layer = BcosConv2d(6, 4, 3, padding=1).double()
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    with explanation_mode(layer):
        y_explaining = layer(x)
    assert torch.equal(y_explaining, layer(x))


def test_conv_output_is_cosine_scaled_linear_map():
    """For B = 2 and a 1×1 conv, y = |cos(x, ŵ)| · ŵᵀx with the per-pixel norm of x."""
    layer = BcosConv2d(5, 3, 1).double()
    x = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    w_hat = layer.linear.weight[:, :, 0, 0] / layer.linear.weight[:, :, 0, 0].norm(dim=1, keepdim=True)
    lin = torch.einsum("oc,nchw->nohw", w_hat, x)
    cos = lin / (x.square().sum(1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(layer(x), cos.abs() * lin, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: BcosConv2d(3, 4, b=0.5), "b must be >= 1"),
        (lambda: BcosConv2d(3, 4, max_out=0), "max_out must be >= 1"),
        (lambda: BcosLinear(3, 4, bias=True), "no bias"),
        (lambda: BcosConv2d(3, 4, padding_mode="reflect"), "padding_mode"),
    ],
)
def test_invalid_layer_arguments(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()
