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
