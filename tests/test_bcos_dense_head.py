"""``e2kd::bcos_dense_head`` (``e2kd_fast/ops/bcos_dense_head.py``) against a dense layer's own modules,
and the teacher sweep that runs it against autograd.

Its opcheck, gradcheck and gradgradcheck over the tensor arguments run with every registered op in
``tests/test_opcheck.py``; the feature maps, a list, are checked here.
"""

from __future__ import annotations

import pytest
import torch

from e2kd_fast import AddInverse, create_model, dynamic_weights, ops
from e2kd_fast.explain import sweep
from e2kd_fast.models.bcos_densenet import DenseLayer
from e2kd_fast.nn import BcosConv2d, make_norm2d
from e2kd_fast.reference.bcos import unit_norm_weight
from tests.helpers import randomize_norms, rel_err


def _layer(channels: int, b: float = 2.0) -> DenseLayer:
    conv = lambda *a, **k: BcosConv2d(*a, b=b, **k)  # noqa: E731
    return randomize_norms(DenseLayer(channels, 3, 2, 0.0, conv, make_norm2d("bnu"))).double().eval()


def _head(layer: DenseLayer, features: list[torch.Tensor]):
    norm, conv = layer.norm1, layer.conv1
    return ops.bcos_dense_head(features, norm.running_var, norm.weight, norm.eps, conv.linear.weight, float(conv.b))


@pytest.mark.parametrize("b", [2.0, 1.5])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_dense_head_equals_the_layer_modules(b, channels_last):
    """The op's output and scale are the norm and the 1×1 B-cos conv of the layer, run as modules on
    the concatenation; its matrix is ŵ·diag(γ/σ); outputs keep the features' memory format."""
    layer = _layer(7, b)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    features = [torch.randn(2, c, 5, 4, dtype=torch.float64).contiguous(memory_format=layout) for c in (4, 3)]
    out, scale, folded = _head(layer, features)
    y = layer.norm1(torch.cat(features, 1))
    torch.testing.assert_close(out, layer.conv1(y), rtol=1e-12, atol=1e-14)
    linear = torch.nn.functional.conv2d(y, unit_norm_weight(layer.conv1.linear.weight))
    torch.testing.assert_close(scale * linear, out, rtol=1e-12, atol=1e-14)
    inv_std = layer.norm1.normalise(torch.cat(features, 1))[1].flatten()  # the norm's own 1/σ
    expected = unit_norm_weight(layer.conv1.linear.weight)[:, :, 0, 0] * (layer.norm1.weight * inv_std)
    torch.testing.assert_close(folded, expected, rtol=1e-12, atol=1e-14)
    assert out.is_contiguous(memory_format=layout) and scale.is_contiguous(memory_format=layout)


def test_dense_head_edge_magnitudes():
    """Zero features give a zero output and scale (the norm's ε keeps the division finite); tiny and
    huge ones stay finite and match the modules."""
    layer = _layer(5)
    for magnitude in (0.0, 1e-150, 1e150):
        features = [magnitude * torch.randn(1, 5, 3, 3, dtype=torch.float64)]
        out, scale, _ = _head(layer, features)
        assert torch.isfinite(out).all() and torch.isfinite(scale).all()
        torch.testing.assert_close(out, layer.conv1(layer.norm1(features[0])), rtol=1e-12, atol=0.0)


def test_dense_head_rejects_bad_input_with_a_clear_error():
    layer = _layer(5)
    features = [torch.randn(1, 3, 4, 4, dtype=torch.float64), torch.randn(1, 2, 4, 4, dtype=torch.float64)]
    with pytest.raises(ValueError, match="sharing N, H and W"):
        _head(layer, [features[0], features[1][:, :, :3]])
    with pytest.raises(ValueError, match=r"must be \[K, 4, 1, 1\] for features of 4 channels"):
        _head(layer, [features[0], features[1][:, :1]])
    norm, conv = layer.norm1, layer.conv1
    with pytest.raises(ValueError, match="running variance and weight must be"):
        ops.bcos_dense_head(features, norm.running_var[:4], norm.weight, norm.eps, conv.linear.weight, 2.0)
    with pytest.raises(ValueError, match="B = 1 has no scale"):
        ops.bcos_dense_head(features, norm.running_var, norm.weight, norm.eps, conv.linear.weight, 1.0)


def test_dense_head_gradients_reach_every_feature_map():
    """gradcheck and gradgradcheck with the feature maps (a list argument) among the inputs."""
    gen = torch.Generator().manual_seed(3)
    features = [torch.randn(1, c, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True) for c in (2, 3)]
    var = (torch.rand(5, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    gamma = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 5, 1, 1, generator=gen, dtype=torch.float64, requires_grad=True)

    def head(f0, f1, var, gamma, weight):
        return ops.bcos_dense_head([f0, f1], var, gamma, 1e-5, weight, 2.0)

    inputs = (*features, var, gamma, weight)
    assert torch.autograd.gradcheck(head, inputs)
    assert torch.autograd.gradgradcheck(head, inputs)


@pytest.mark.parametrize("name", ["bcos_densenet121", "bcos_densenet169"])
def test_teacher_sweep_runs_each_head_as_the_op_and_equals_autograd(name, monkeypatch):
    """A teacher's sweep (eval, no gradient) runs every dense layer's head as the op, and its
    explanation and logits equal autograd's through the modules; a student's sweep keeps the heads
    inline (its gradient flows through them)."""
    torch.set_default_dtype(torch.float64)
    teacher = randomize_norms(create_model(name, num_classes=4)).eval().requires_grad_(False)
    calls, head = [], ops.bcos_dense_head
    monkeypatch.setattr(sweep.ops, "bcos_dense_head", lambda *a: calls.append(1) or head(*a))
    x6 = AddInverse()(torch.rand(2, 3, 32, 32))
    expected, expected_logits = dynamic_weights(teacher, x6, None, return_logits=True)
    with torch.no_grad():
        swept, logits = dynamic_weights(teacher, x6, None, algorithm="sweep", return_logits=True)
    assert len(calls) == sum(isinstance(m, DenseLayer) for m in teacher.modules())
    assert rel_err(logits, expected_logits) < 1e-12
    assert rel_err(swept, expected) < 1e-10
    calls.clear()
    student = create_model(name, num_classes=4).eval()
    dynamic_weights(student, x6, None, algorithm="sweep")
    assert not calls
    monkeypatch.setattr(sweep, "dense_heads_as_op", False)  # inline, as before the op
    with torch.no_grad():
        inline = dynamic_weights(teacher, x6, None, algorithm="sweep")
    assert not calls and rel_err(inline, expected) < 1e-10
