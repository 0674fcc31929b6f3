"""The back-end choice of the ``e2kd::`` ops (`e2kd_fast.ops.backends`)."""

from __future__ import annotations

import pytest
import torch

from e2kd_fast.ops import backends, distill_loss


def test_reference_is_registered_for_every_op_and_auto_falls_back_to_it(monkeypatch):
    monkeypatch.delenv("E2KD_BACKEND", raising=False)
    table = backends.describe("cpu")
    assert "e2kd::distill_loss" in table
    assert set(table.values()) <= {"reference", "cpp", "triton"}
    with backends.use_backend("reference"):
        assert set(backends.describe("cpu").values()) == {"reference"}


def test_environment_variable_is_read_at_call_time_and_checked(monkeypatch):
    monkeypatch.setenv("E2KD_BACKEND", "reference")
    assert backends.current_backend() == "reference"
    monkeypatch.setenv("E2KD_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="E2KD_BACKEND.*cuda-magic.*auto, reference, triton, cpp"):
        backends.current_backend()


def test_context_manager_nests_and_restores(monkeypatch):
    monkeypatch.setenv("E2KD_BACKEND", "auto")
    with backends.use_backend("reference"):
        assert backends.current_backend() == "reference"
        with backends.use_backend("auto"):
            assert backends.current_backend() == "auto"
        assert backends.current_backend() == "reference"
    assert backends.current_backend() == "auto"
    with pytest.raises(ValueError, match="unknown e2kd back end 'fast'"):
        with backends.use_backend("fast"):
            pass


def test_unavailable_backend_is_an_error_that_says_why(monkeypatch):
    monkeypatch.setattr(backends, "unavailable_reason", lambda name: "the extension is not built (test)")
    with pytest.raises(RuntimeError, match="'cpp' is not available: the extension is not built"):
        with backends.use_backend("cpp"):
            pass


def test_every_backend_gives_the_reference_loss():
    torch.manual_seed(0)
    args = (torch.randn(4, 10), torch.randn(4, 10), torch.randn(4, 6, 5, 5), torch.randn(4, 6, 5, 5), 2.0, 3.0)
    with backends.use_backend("reference"):
        expected = distill_loss(*args)
    for name in backends.candidates("e2kd::distill_loss", "cpu"):
        with backends.use_backend(name):
            got = distill_loss(*args)
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"back end {name}")


def test_auto_reads_records_per_shape_class_and_their_kernel_variant(monkeypatch):
    """``fastest.json`` refines an op's record per shape class; a value may name a kernel variant."""
    monkeypatch.delenv("E2KD_BACKEND", raising=False)
    monkeypatch.setattr(backends, "candidates", lambda op, device: ["cpp", "triton", "reference"])
    table = {
        "e2kd::bcos_conv2d@cuda": "reference",
        "e2kd::bcos_conv2d@cuda@k3x3-s1x1": "triton:implicit-gemm",
        "e2kd::bcos_conv2d@cuda@k1x1-s2x2": "cpp",
        "e2kd::bcos_conv2d@cuda@k7x7-s2x2": "magic",  # not available here: the op's own record runs
    }
    monkeypatch.setattr(backends, "_fastest_table", lambda: table)
    op = "e2kd::bcos_conv2d"
    assert backends.choose(op, "cuda") == "reference"
    assert backends.choose(op, "cuda", "k3x3-s2x2") == "reference"  # no record for the class: the op's
    assert backends.choose(op, "cuda", "k3x3-s1x1") == "triton"
    assert backends.recorded_variant(op, "cuda", "k3x3-s1x1") == "implicit-gemm"
    assert backends.use_fused(op, "cuda", "k3x3-s1x1") and not backends.use_fused(op, "cuda", "k3x3-s2x2")
    assert backends.choose(op, "cuda", "k1x1-s2x2") == "cpp"
    assert backends.recorded_variant(op, "cuda", "k1x1-s2x2") is None
    assert backends.choose(op, "cuda", "k7x7-s2x2") == "reference"
    assert backends.implementation(op, "cuda", "k3x3-s1x1") is backends.registered(op)["triton"]
    with backends.use_backend("triton"):  # asked by name: the record's variant does not apply
        assert backends.choose(op, "cuda", "k1x1-s2x2") == "triton"
        assert backends.recorded_variant(op, "cuda", "k3x3-s1x1") is None
