"""The base of modules that honour explanation mode (`explanation_mode`, from `e2kd_fast.reference.dynamic`)."""

from __future__ import annotations

from torch import Tensor, nn

from e2kd_fast.reference.dynamic import dynamic_matmul, dynamic_multiply, explanation_mode


class DynamicLinearModule(nn.Module):
    """A module that is linear in its input once its data-dependent factors are held fixed.

    Subclasses route every "dynamic weight × signal" product through `dyn_mul` / `dyn_matmul`.
    Outside explanation mode these are plain products. Inside it they carry the official e²KD
    gradient semantics (see `e2kd_fast.reference.dynamic`): the explanation treats the dynamic
    weights as constants, and gradients of anything computed from it still flow through them.
    """

    explaining: bool = False  # class default: subclasses of torch modules need no extra __init__

    def set_explanation_mode(self, active: bool = True) -> None:
        self.explaining = bool(active)

    def dyn_mul(self, weight: Tensor, x: Tensor) -> Tensor:
        return dynamic_multiply(weight, x, self)

    def dyn_matmul(self, weight: Tensor, x: Tensor) -> Tensor:
        return dynamic_matmul(weight, x, self)


__all__ = ["DynamicLinearModule", "explanation_mode"]
