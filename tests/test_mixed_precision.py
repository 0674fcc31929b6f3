"""The e²KD step under bf16 autocast: fp32 weights, low-precision activations, every back end.

The GPU runs the step in bf16 (`train.precision: bf16`); CPU autocast exercises the same dtype mix
(conv outputs and sweep gradients in bf16, weights in fp32) through the ops and their backwards.
"""

from __future__ import annotations

import pytest
import torch

from e2kd_fast.engine.step import TrainStep
from e2kd_fast.models import create_model
from e2kd_fast.ops import backends


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_e2kd_step_runs_under_bf16_autocast(backend):
    if backend not in backends.candidates("e2kd::distill_loss", "cpu"):
        pytest.skip(f"the {backend} back end is not available here")
    student = create_model("bcos_resnet20_cifar", num_classes=5)
    teacher = create_model("bcos_resnet20_cifar", num_classes=5).eval().requires_grad_(False)
    x = torch.rand(2, 6, 16, 16).contiguous(memory_format=torch.channels_last)
    with backends.use_backend(backend):
        step = TrainStep(student, teacher, lam=2.0)
        reference = step(x, None, 0)  # fp32
        reference["loss"].backward()
        reference_grads = [p.grad.clone() for p in student.parameters()]
        student.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = step(x, None, 0)
        out["loss"].backward()
    assert torch.isfinite(out["loss"])
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    # bf16 rounding, not a different step: the loss and gradient stay close to the fp32 ones.
    assert out["loss"].item() == pytest.approx(reference["loss"].item(), rel=5e-2)
    flat, flat_ref = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in reference_grads])
    assert torch.nn.functional.cosine_similarity(flat, flat_ref, dim=0) > 0.9
