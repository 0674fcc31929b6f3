"""The compiled training step equals the eager one for every teacher/student pair in configs/.

Each pair is compiled whole (``TrainStep(compile=True)``: Inductor, fullgraph) at 32 px, where the
maps of the deepest stages reach 2×2 and 1×1 and layouts become ambiguous, in float32 and float64,
and its loss and student gradients are compared with the eager step's. The models are the configs'
architectures with fewer blocks and channels (the same block classes, the same 32 px geometry), so a
compile takes seconds rather than minutes on two cores; `tests/test_layouts.py` runs the full-size
pairs' external kernels against their fakes in every layout. ``E2KD_FULL_COMPILE_TESTS=1`` compiles
the full-size pairs too (minutes per pair).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import pytest
import torch
import torch._dynamo
import torchvision
from torch import nn

from e2kd_fast import create_model
from e2kd_fast.engine.step import TrainStep
from e2kd_fast.models.bcos_densenet import BcosDenseNet
from e2kd_fast.models.bcos_resnet import BasicBlock, BcosResNet, Bottleneck
from e2kd_fast.models.bcos_vit import BcosViT
from tests.helpers import config_pairs, randomize_norms

# Each config architecture at reduced depth and width: same classes, same downsampling.
MINIATURE: dict[str, Callable[[int], nn.Module]] = {
    "bcos_resnet18": lambda n: BcosResNet(BasicBlock, [1, 1, 1, 1], n, inplanes=16),
    "bcos_resnet34": lambda n: BcosResNet(BasicBlock, [1, 2, 1, 1], n, inplanes=16),
    "bcos_resnet50": lambda n: BcosResNet(Bottleneck, [1, 1, 1, 1], n, inplanes=16, width_per_group=16),
    # Two layers in the first dense block: its adjoint hands one layer's input gradient to the next.
    "bcos_densenet169": lambda n: BcosDenseNet(8, (2, 1, 1, 1), 16, num_classes=n),
    "bcos_vit_ti_patch16_224": lambda n: BcosViT(16, 48, 1, 3, 96, num_classes=n),
    "resnet18": lambda n: torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], n),
    "resnet34": lambda n: torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 2, 1, 1], n),
    "resnet50": lambda n: torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 1, 1], n),
}
PAIRS = config_pairs()
FULL = os.environ.get("E2KD_FULL_COMPILE_TESTS") == "1"


def test_every_config_architecture_has_a_miniature():
    names = {name for student, teacher, _ in PAIRS for name in (student, teacher)}
    assert names <= set(MINIATURE), f"add a miniature for {sorted(names - set(MINIATURE))}"


def _models(student: str, teacher: str) -> tuple[nn.Module, nn.Module]:
    """The pair in float64 (the truth the low-precision steps are measured against)."""
    torch.manual_seed(0)
    build = (lambda name: create_model(name, num_classes=3)) if FULL else (lambda name: MINIATURE[name](3))
    s = randomize_norms(build(student)).double().train()
    t = randomize_norms(build(teacher)).double().eval().requires_grad_(False)
    return s, t


def _inputs(channels: int) -> torch.Tensor:
    """Four images, each with its own colour plus noise: batch statistics of the 1×1 maps stay
    well conditioned (two noise images make them nearly degenerate)."""
    gen = torch.Generator().manual_seed(1)
    colour = torch.rand(4, 3, 1, 1, generator=gen, dtype=torch.float64)
    rgb = (0.7 * colour + 0.3 * torch.rand(4, 3, 32, 32, generator=gen, dtype=torch.float64)).clamp(0, 1)
    return torch.cat([rgb, 1 - rgb], 1) if channels == 6 else (rgb - 0.45) / 0.25


def _step(student: nn.Module, teacher: nn.Module, x: torch.Tensor, compile: bool, explanation: str):
    """(loss, [student gradients]) of one e²KD step; the student's buffers are restored afterwards."""
    buffers = copy.deepcopy(student.state_dict())
    student.zero_grad(set_to_none=True)
    step = TrainStep(student, teacher, tau=2.0, lam=5.0, explanation=explanation, compile=compile, log=lambda _: None)
    out = step(x, None, 0)
    out["loss"].backward()
    grads = [p.grad.clone() for p in student.parameters() if p.grad is not None]
    student.load_state_dict(buffers)
    return out["loss"].detach(), grads


def _errors(got, truth) -> list[float]:
    """max |got − truth| / max |truth| of the loss and of each gradient."""
    loss, grads = got
    pairs = [(loss, truth[0]), *zip(grads, truth[1], strict=True)]
    return [((g.double() - e).abs().max() / e.abs().max().clamp_min(1e-30)).item() for g, e in pairs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(("student", "teacher", "explanation"), PAIRS, ids=[f"{s}<-{t}" for s, t, _ in PAIRS])
def test_compiled_step_equals_eager(student, teacher, explanation, dtype):
    torch._dynamo.reset()
    s, t = _models(student, teacher)
    x = _inputs(6 if explanation == "bcos" else 3)
    truth = _step(s, t, x, False, explanation)
    s, t, x = s.to(dtype), t.to(dtype), x.to(dtype)
    eager = _errors(_step(s, t, x, False, explanation), truth)
    compiled = _errors(_step(s, t, x, True, explanation), truth)
    assert len(compiled) == len(eager)
    # Within a few times the eager step's own rounding error in this dtype; Inductor reorders sums.
    # The floor allows for the conditioning of B-cos gradients (they divide by small norms; float64
    # steps differ by up to 4e-9 of the largest gradient, float32 ones by up to 5e-3): a wrong layout
    # or kernel is off by the gradient's own size.
    floor = 1e-7 if dtype == torch.float64 else 1e-2
    for name, c, e in zip(["loss"] + [f"grad {i}" for i in range(len(eager) - 1)], compiled, eager, strict=True):
        assert c <= 4 * e + floor, f"{name}: compiled error {c:.3g} vs eager {e:.3g}"
