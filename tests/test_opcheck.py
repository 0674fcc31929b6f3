"""Every registered e2kd:: op: opcheck, float64 gradcheck and gradgradcheck, and its reference."""

from __future__ import annotations

import sys

import pytest
import torch

from e2kd_fast.ops import OPS, backends, distill_loss


def test_every_op_is_listed():
    """Every op in the e2kd namespace has sample inputs in ops/_registry.py, so the checks below run on it."""
    registered = {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("e2kd::")}
    assert registered and registered == {t.name for t in OPS}


@pytest.mark.parametrize("case", OPS, ids=[case.name for case in OPS])
def test_every_op_runs_its_reference(case):
    """Each op names its maths in e2kd_fast/reference/, and its reference back end calls exactly
    that (so the maths is stated once: ops and kernels are tested against it, never a copy)."""
    assert case.references, f"{case.name} names no reference"
    for fn in case.references:
        assert fn.__module__.startswith("e2kd_fast.reference."), f"{case.name}: {fn.__qualname__} is not in reference/"
    wanted = {fn.__code__ for fn in case.references}
    called = set()

    def profile(frame, event, arg):
        if event == "call" and frame.f_code in wanted:
            called.add(frame.f_code)

    with backends.use_backend("reference"), torch.no_grad():
        for args in case.sample_inputs():
            sys.setprofile(profile)
            try:
                case.op(*args)
            finally:
                sys.setprofile(None)
    missing = [fn.__qualname__ for fn in case.references if fn.__code__ not in called]
    assert not missing, f"{case.name}'s reference back end does not call {missing}"


# Every (op, back end) that runs on CPU tensors here: the reference, the C++ kernels when the
# extension is built, Triton in the interpreter (TRITON_INTERPRET=1).
BACKEND_CASES = [(case, b) for case in OPS for b in backends.candidates(case.name, "cpu")]
BACKEND_IDS = [f"{case.name}-{b}" for case, b in BACKEND_CASES]


@pytest.mark.parametrize(("case", "backend"), BACKEND_CASES, ids=BACKEND_IDS)
def test_opcheck(case, backend):
    with backends.use_backend(backend):
        for args in case.sample_inputs():
            torch.library.opcheck(case.op, args)


@pytest.mark.parametrize(("case", "backend"), BACKEND_CASES, ids=BACKEND_IDS)
def test_gradcheck_and_gradgradcheck(case, backend):
    fast = backend == "triton"  # the interpreter costs ~0.1 s per call: random-projection checks
    for args in case.sample_inputs():
        differentiable = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

        def f(*tensors, args=args, differentiable=differentiable):
            full = list(args)
            for i, t in zip(differentiable, tensors, strict=True):
                full[i] = t
            return case.op(*full)

        inputs = tuple(args[i] for i in differentiable)
        with backends.use_backend(backend):
            assert torch.autograd.gradcheck(f, inputs, fast_mode=fast)
            assert torch.autograd.gradgradcheck(f, inputs, fast_mode=fast)


def test_distill_loss_compiles_in_one_graph():
    torch._dynamo.reset()
    zs, zt = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5)
    es, et = torch.randn(4, 6, 3, 3, requires_grad=True), torch.randn(4, 6, 3, 3)
    fn = torch.compile(lambda *a: distill_loss(*a, 2.0, 1.0)[0], fullgraph=True, backend="aot_eager")
    fn(zs, zt, es, et).backward()
    expected = torch.autograd.grad(distill_loss(zs, zt, es, et, 2.0, 1.0)[0], (zs, es))
    torch.testing.assert_close(zs.grad, expected[0])
    torch.testing.assert_close(es.grad, expected[1])
