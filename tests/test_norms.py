"""No-bias norms against the official `bcos` norms (wrapped in NoBias, as the official models use them)."""

from __future__ import annotations

import pytest
import torch
from bcos.modules import norms as official

from e2kd_fast.nn import (
    BatchNormUncentered2d,
    DetachableGNLayerNorm2d,
    DetachableGroupNorm2d,
    DetachableLayerNorm,
    DetachablePositionNorm2d,
    explanation_mode,
    make_norm2d,
)
from tests.helpers import randomize_norms, rel_err

PAIRS = [  # (ours, official, input shape)
    (lambda: BatchNormUncentered2d(6), lambda: official.NoBias(official.BatchNormUncentered2d)(6), (4, 6, 5, 5)),
    (lambda: DetachablePositionNorm2d(6), lambda: official.NoBias(official.DetachablePositionNorm2d)(6), (2, 6, 4, 3)),
    (lambda: DetachableGroupNorm2d(2, 6), lambda: official.NoBias(official.DetachableGroupNorm2d)(2, 6), (2, 6, 4, 4)),
    (lambda: DetachableGNLayerNorm2d(6), lambda: official.NoBias(official.DetachableGNLayerNorm2d)(6), (2, 6, 4, 4)),
    (lambda: DetachableLayerNorm(6), lambda: official.NoBias(official.DetachableLayerNorm)(6), (2, 5, 6)),
]


@pytest.mark.parametrize(("ours_fn", "official_fn", "shape"), PAIRS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("explaining", [False, True])
def test_norm_matches_official(ours_fn, official_fn, shape, training, explaining):
    ours, ref = randomize_norms(ours_fn().double()), official_fn().double()
    assert ours.bias is None and ref.bias is None
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ref.load_state_dict(ours.state_dict())
    ours.train(training), ref.train(training)
    x = torch.randn(*shape, dtype=torch.float64) + 0.3
    with explanation_mode(ours, explaining), explanation_mode(ref, explaining):
        y_ours, y_ref = ours(x), ref(x)
    assert rel_err(y_ours, y_ref) < 1e-13
    for name, buffer in ref.named_buffers():  # running statistics move identically
        torch.testing.assert_close(ours.get_buffer(name), buffer, rtol=1e-14, atol=0)


def test_uncentred_batch_norm_does_not_subtract_the_mean():
    norm = BatchNormUncentered2d(3).double().train()
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64) + 5.0
    expected = x / (x.var(dim=(0, 2, 3), unbiased=False) + norm.eps).sqrt()[None, :, None, None]
    torch.testing.assert_close(norm(x), expected, rtol=1e-13, atol=0)


def test_cumulative_running_average_without_momentum():
    norm = BatchNormUncentered2d(2, momentum=None).double().train()
    batches = [torch.randn(4, 2, 3, 3, dtype=torch.float64) for _ in range(3)]
    for x in batches:
        norm(x)
    expected = torch.stack([x.var(dim=(0, 2, 3), unbiased=False) for x in batches]).mean(0)
    torch.testing.assert_close(norm.running_var, expected, rtol=1e-13, atol=0)


def test_norm_factory():
    assert isinstance(make_norm2d("bnu")(4), BatchNormUncentered2d)
    assert isinstance(make_norm2d("gn2")(4), DetachableGroupNorm2d)
    assert isinstance(make_norm2d("none")(4), torch.nn.Identity)
    with pytest.raises(ValueError, match="unknown norm 'batch'"):
        make_norm2d("batch")


def test_norms_reject_wrong_input_shapes():
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        BatchNormUncentered2d(3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="divisible by 4"):
        DetachableGroupNorm2d(4, 8)(torch.randn(2, 6, 3, 3))
