"""Fakes equal reality in every layout, so compiled steps see the strides their kernels write.

A compiled graph calls convolutions, matrix products and the ``e2kd::`` ops as external kernels and
asserts that each returns the strides its fake (meta) function promised. Inductor may hand such a
kernel an input whose layout eager never produced: a 4-D tensor that is both contiguous and
channels_last (H = W = 1, C = 1, ...) can carry either set of strides. So the check here runs every
such call of a real training step with each ambiguous input in both layouts, and compares the
significant strides (of dimensions longer than 1) of the real output with the fake's.
"""

from __future__ import annotations

import pytest
import torch
from torch._prims_common import check_significant_strides
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from e2kd_fast import create_model
from e2kd_fast.engine.step import TrainStep
from e2kd_fast.ops import OPS, backends
from tests.helpers import config_pairs

aten = torch.ops.aten
# What Inductor runs as external kernels in our graphs (everything else it generates itself).
EXTERNAL = {
    aten.convolution.default,
    aten.convolution_backward.default,
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
}


def _is_ambiguous(t: object) -> bool:
    return (
        isinstance(t, torch.Tensor)
        and t.dim() == 4
        and t.is_contiguous()
        and t.is_contiguous(memory_format=torch.channels_last)
    )


def _restrided(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The same values with the canonical strides of one layout (as Inductor may allocate them)."""
    n, c, h, w = t.shape
    strides = (h * w * c, 1, w * c, c) if channels_last else (c * h * w, h * w, w, 1)
    return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device).copy_(t)


def _layout_variants(args: tuple, kwargs: dict) -> list[tuple[tuple, dict]]:
    """The call as made, and with every ambiguous 4-D input given each layout's strides."""
    variants = [(args, kwargs)]
    if any(_is_ambiguous(a) for a in tree_flatten((args, kwargs))[0]):
        for channels_last in (False, True):

            def change(a, channels_last=channels_last):
                return _restrided(a, channels_last) if _is_ambiguous(a) else a

            variants.append(tree_map(change, (args, kwargs)))
    return variants


class FakeStrideCheck(TorchDispatchMode):
    """Runs the checked ops for real and on fake tensors, in every layout of their ambiguous inputs,
    and records each call whose fake promised other strides than the real kernel wrote."""

    def __init__(self) -> None:
        super().__init__()
        self.mismatches: list[str] = []
        self.checked = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in EXTERNAL or func.namespace == "e2kd":
            self._compare(func, args, kwargs, out)  # the call as made: its real output is at hand
            for v_args, v_kwargs in _layout_variants(args, kwargs)[1:]:
                self._compare(func, v_args, v_kwargs)
        return out

    def _compare(self, func, args, kwargs, out=None) -> None:
        real = tree_flatten(func(*args, **kwargs) if out is None else out)[0]
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_args, fake_kwargs = tree_map(
                lambda a: mode.from_tensor(a) if isinstance(a, torch.Tensor) else a, (args, kwargs)
            )
            fake = tree_flatten(func(*fake_args, **fake_kwargs))[0]
        self.checked += 1
        for i, (r, f) in enumerate(zip(real, fake, strict=True)):
            if isinstance(r, torch.Tensor) and r.numel() and not check_significant_strides(r, f, only_cuda=False)[0]:
                inputs = [(tuple(a.shape), a.stride()) for a in tree_flatten(args)[0] if isinstance(a, torch.Tensor)]
                self.mismatches.append(f"{func} output {i}: real {r.stride()} fake {f.stride()}; inputs {inputs}")


# --------------------------------------------------------------------------------------------------
# Every op, on its sample inputs and on inputs shaped to be ambiguous, on every back end
# --------------------------------------------------------------------------------------------------


def _ambiguous_inputs(args: tuple) -> list[tuple]:
    """The op's sample inputs with 4-D tensors cut to H = W = 1 and to C = 1 where the op allows."""
    cases = []
    for cut in ("spatial", "channels"):

        def shrink(a, cut=cut):
            if not (isinstance(a, torch.Tensor) and a.dim() == 4):
                return a
            return a[:, :, :1, :1] if cut == "spatial" else a[:, :1]

        cases.append(tuple(shrink(a) for a in args))
    return cases


def _check_op_layouts(case, device: str) -> None:
    for backend in backends.candidates(case.name, device):
        check = FakeStrideCheck()
        with backends.use_backend(backend), torch.no_grad():
            for args in case.sample_inputs():
                args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
                for variant in [args, *_ambiguous_inputs(args)]:
                    try:
                        case.op(*[a.detach() if isinstance(a, torch.Tensor) else a for a in variant])
                    except (RuntimeError, ValueError):
                        continue  # a cut the op's geometry does not allow (checked before dispatch)
                    for v_args, _ in _layout_variants(variant, {}):
                        check._compare(case.op._opoverload, v_args, {})
        assert check.checked and not check.mismatches, (backend, check.mismatches)


@pytest.mark.parametrize("case", OPS, ids=[case.name for case in OPS])
def test_every_op_fake_matches_its_kernels_in_every_layout(case):
    _check_op_layouts(case, "cpu")


@pytest.mark.requires_cuda
@pytest.mark.parametrize("case", OPS, ids=[case.name for case in OPS])
def test_every_op_fake_matches_its_cuda_kernels_in_every_layout(case):
    _check_op_layouts(case, "cuda")


# --------------------------------------------------------------------------------------------------
# The training step of every teacher/student pair in configs/, at 32 px (maps reach 2×2 and 1×1)
# --------------------------------------------------------------------------------------------------


PAIRS = config_pairs()


# The default choice, and the C++ layer kernels where the extension is built (the layers then call
# the e2kd:: layer ops instead of inline torch ops).
STEP_BACKENDS = ["auto", *(["cpp"] if "cpp" in backends.candidates("e2kd::bcos_conv2d", "cpu") else [])]


@pytest.mark.parametrize("backend", STEP_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(("student", "teacher", "explanation"), PAIRS, ids=[f"{s}<-{t}" for s, t, _ in PAIRS])
def test_training_step_external_kernels_match_their_fakes(student, teacher, explanation, dtype, backend):
    if backend != "auto" and (explanation != "bcos" or dtype != torch.float64):
        pytest.skip("the layer kernels' layouts do not depend on the dtype; standard networks use none")
    torch.manual_seed(0)
    s = create_model(student, num_classes=3).to(dtype).train()
    t = create_model(teacher, num_classes=3).to(dtype).eval().requires_grad_(False)
    x = torch.rand(2, 6 if explanation == "bcos" else 3, 32, 32, dtype=dtype)
    step = TrainStep(s, t, tau=2.0, lam=5.0, explanation=explanation)
    check = FakeStrideCheck()
    with backends.use_backend(backend), check:
        step(x, None, 0)["loss"].backward()
    assert check.checked and not check.mismatches, check.mismatches[:5]
