"""The list of registered ``e2kd::`` ops and their test inputs.

Every op module registers its op here with a function returning sample inputs (float64, the
differentiable inputs with ``requires_grad``). ``tests/test_opcheck.py`` walks this list and runs
``torch.library.opcheck``, ``gradcheck`` and ``gradgradcheck`` on every op, so no op can be added
without those checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class OpTest:
    op: Callable
    sample_inputs: Callable[[], list[tuple]]

    @property
    def name(self) -> str:
        """The op's qualified name, ``e2kd::<op>``."""
        return self.op._qualname


OPS: list[OpTest] = []


def register_op_test(op: Callable, sample_inputs: Callable[[], list[tuple]]) -> None:
    OPS.append(OpTest(op, sample_inputs))
