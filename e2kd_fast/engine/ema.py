"""An exponential moving average (EMA) of the student's weights, as timm's ``ModelEmaV3`` keeps it.

After every applied optimiser step each floating-point entry of the student's state dict moves towards
the student's current value::

    shadow ← decay · shadow + (1 − decay) · value        (`torch._foreach_lerp_` with weight 1 − decay)

``decay`` counts per optimiser step (not per micro-batch): the average spans about ``1 / (1 − decay)``
steps. The shadows are float32 copies, on the student's device, starting from the student's weights.

Buffers: floating buffers (BatchNorm running means and variances) are averaged like the parameters,
as timm's ``ModelEmaV2`` / ``ModelEmaV3`` do by default, so that the statistics the averaged network
normalises with follow the same time average as the weights producing its activations; a copy of the
student's latest statistics would pair them with weights they were not measured for. Integer buffers
(``num_batches_tracked``) are copied.

The EMA holds the student's whole weights, so it needs them replicated on every rank: one process, DDP
and DeepSpeed ZeRO-1/2 (ZeRO-3, which partitions parameters, is refused by ``engine.zero_stage``).
Every rank keeps its own copy (the same weights; BatchNorm statistics may differ by rank); rank 0's is
saved, and a split evaluation runs every rank's with rank 0's statistics (`Trainer.evaluate`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class EmaWeights:
    """Float32 shadow copies of ``model``'s state dict, moved towards it by `update`.

    Args:
        model: the student (not a DDP / DeepSpeed wrapper: its state-dict keys are the checkpoint's).
        decay: in (0, 1); the weight of the old average in each update.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1); got {decay!r}")
        self.decay = float(decay)
        state = model.state_dict()
        self._averaged = [k for k, v in state.items() if v.is_floating_point()]
        self._copied = [k for k, v in state.items() if not v.is_floating_point()]
        with torch.no_grad():
            self._shadow: dict[str, Tensor] = {
                k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype, copy=True)
                for k, v in state.items()
            }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s current weights; call once per applied optimiser step."""
        state = model.state_dict()
        shadows = [self._shadow[k] for k in self._averaged]
        values = [state[k].detach().float() for k in self._averaged]  # .float() is a no-op for fp32 weights
        if shadows:
            torch._foreach_lerp_(shadows, values, 1.0 - self.decay)
        for k in self._copied:
            self._shadow[k].copy_(state[k])

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged weights as a state dict of the student (same keys; floating entries float32)."""
        return dict(self._shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restores `state_dict`'s output exactly (a resume); the keys must be the student's.

        Raises:
            ValueError: missing or unexpected keys, or a shape that differs (nothing is loaded then).
        """
        missing = sorted(set(self._shadow) - set(state))
        unexpected = sorted(set(state) - set(self._shadow))
        shapes = [k for k in self._shadow if k in state and state[k].shape != self._shadow[k].shape]
        if missing or unexpected or shapes:
            raise ValueError(
                f"the EMA weights do not fit the student: missing {missing[:8]}, unexpected {unexpected[:8]}, "
                f"other shapes {shapes[:8]}"
            )
        for k, shadow in self._shadow.items():
            shadow.copy_(state[k])

    def reset(self, model: nn.Module) -> None:
        """Starts the average afresh from ``model``'s current weights."""
        self.load_state_dict(model.state_dict())

    @contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block ``model`` holds the averaged weights; afterwards its own again, bit for bit.

        The weights are copied in place, so the optimiser's and the strategies' references to the
        parameters stay valid. Meant for evaluation (no training step inside the block).
        """
        state = model.state_dict()
        with torch.no_grad():
            own = {k: v.detach().clone() for k, v in state.items()}
            for k, v in state.items():
                v.copy_(self._shadow[k])
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, v in state.items():
                    v.copy_(own[k])

    def __len__(self) -> int:
        """Number of averaged tensors."""
        return len(self._averaged)


__all__ = ["EmaWeights"]
