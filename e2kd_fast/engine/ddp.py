"""The DDP strategy: torch DistributedDataParallel around the objective module."""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from e2kd_fast.engine.strategy import Strategy


class DDPStrategy(Strategy):
    """torch DistributedDataParallel: gradients averaged over ranks during the backward.

    Under gradient accumulation only the last micro-batch's backward all-reduces (``no_sync`` for
    the others). Buffers (BatchNorm running statistics) are broadcast from rank 0 at every forward;
    batch statistics are per rank (per ``B / world_size`` images), as in every DDP run.
    """

    name = "ddp"

    def __init__(
        self, env, module, optimizer, clipping, scaler=None, *, device: torch.device, find_unused_parameters=False
    ):
        super().__init__(env, module, optimizer, clipping, scaler)
        self.wrapped = DistributedDataParallel(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
        )

    def forward(self, images, labels, step, frozen, *, last_micro: bool):
        # What `no_sync()` sets: DDP reads it in forward to decide whether this backward all-reduces.
        self.wrapped.require_backward_grad_sync = last_micro
        return self.wrapped(images, labels, step, frozen)


__all__ = ["DDPStrategy"]
