"""Explanation mode: a context manager over any model, and the base of modules that honour it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn

from e2kd_fast.reference.dynamic import dynamic_matmul, dynamic_multiply


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


@contextlib.contextmanager
def explanation_mode(model: nn.Module, active: bool = True) -> Iterator[nn.Module]:
    """Puts every module of ``model`` that supports it into explanation mode for the block.

    Works on any model: modules with a ``set_explanation_mode`` method (these and the official
    `bcos` modules) are switched; others are left alone. Nesting is safe: each module's previous
    state is restored on exit, also when the block raises.

    Note that with the official semantics the flag is read when a backward runs: compute the
    explanation inside the block, and call the final ``loss.backward()`` after it.

    Example:
        >>> with explanation_mode(model):
        ...     logits = model(x6)
        ...     (W,) = torch.autograd.grad(logits[:, c].sum(), x6, create_graph=True)
    """
    switched = [m for m in model.modules() if callable(getattr(m, "set_explanation_mode", None))]
    previous = [_current_state(m) for m in switched]
    try:
        for m in switched:
            m.set_explanation_mode(active)
        yield model
    finally:
        for m, state in zip(switched, previous, strict=True):
            m.set_explanation_mode(state)


def _current_state(module: nn.Module) -> bool:
    # Our modules expose `explaining`; the official `bcos` modules expose `detach`.
    for attr in ("explaining", "detach"):
        value = getattr(module, attr, None)
        if isinstance(value, bool):
            return value
    return False
