"""Optimiser pieces against the official B-cos trainer's: AGC and the warm-up + cosine schedule."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import bcos
import pytest
import torch

from e2kd_fast.engine.optim import adaptive_clip_grad_, build_optimizer, warmup_cosine_factor


def _official_agc():
    # bcos.training's package import needs matplotlib; load only the AGC module file.
    spec = importlib.util.spec_from_file_location("bcos_agc", Path(bcos.__file__).parent / "training" / "agc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.adaptive_clip_grad_


def test_agc_matches_official():
    torch.manual_seed(0)
    shapes = [(8, 4, 3, 3), (5, 7), (6,), (3, 1, 1, 1), (4, 2, 1, 1)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, theirs, strict=True):
        a.grad = torch.randn_like(a) * torch.rand(()) * 10
        b.grad = a.grad.clone()
    adaptive_clip_grad_(ours)
    _official_agc()(theirs)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


def test_schedule_matches_linear_warmup_then_cosine():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=5)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=15)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[5])
    for epoch in range(20):
        assert warmup_cosine_factor(epoch, total=20, warmup=5) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-9)
        opt.step()
        sched.step()
    assert warmup_cosine_factor(20, 20, 5) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine_factor(3, 10, 0) == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(0.3 * torch.pi))).item())


def test_build_optimizer():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2), requires_grad=False)]
    opt = build_optimizer(params, "adamw", lr=0.1, weight_decay=0.01)
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups[0]["params"]) == 1
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        build_optimizer(params, "lamb", lr=0.1)
