"""The list of registered ``e2kd::`` ops, their test inputs and their references.

Every op module registers its op here with a function returning sample inputs (float64, the
differentiable inputs with ``requires_grad``) and the functions of `e2kd_fast.reference` that state
its maths. ``tests/test_opcheck.py`` walks this list: ``torch.library.opcheck``, ``gradcheck`` and
``gradgradcheck`` on every op, and a check that the op's reference back end runs those reference
functions, so no op can be added without those checks or with a private copy of its maths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class OpTest:
    op: Callable
    sample_inputs: Callable[[], list[tuple]]
    references: tuple[Callable, ...]

    @property
    def name(self) -> str:
        """The op's qualified name, ``e2kd::<op>``."""
        return self.op._qualname


OPS: list[OpTest] = []


def register_op_test(op: Callable, sample_inputs: Callable[[], list[tuple]], *references: Callable) -> None:
    """Lists ``op`` with its sample inputs and the `e2kd_fast.reference` functions its maths is."""
    OPS.append(OpTest(op, sample_inputs, references))
