"""Distribution strategies: one process, DDP, and DeepSpeed ZeRO-1/2, and `make_strategy` that picks one.

A launch (``torchrun``, ``deepspeed``, or a test spawning processes) runs one process per device and
tells each its place through environment variables: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``. `setup_distributed` reads them and starts the process group (nccl
on CUDA, gloo on CPU); `make_strategy` then wraps the student in the strategy ``engine.strategy``
names. The trainer talks to every strategy through the same `Strategy` methods: forward,
backward, optimiser step, reductions of logged values, and checkpoint state in the trainer's own
format.

What is wrapped is an `ObjectiveModule`: the student as its only child, and a ``forward`` that runs
the whole forward-to-loss function (teacher, explanations, KD and cosine terms). DeepSpeed must see
the explanation and the loss computed inside the wrapped module's forward: since v0.18.3 it hooks
every output of ``engine(...)``, and an explanation taken by ``autograd.grad`` on such an output
starts its reduction epilogue early (``IndexError`` in ``reduce_ipg_grads`` under ZeRO-1/2, DeepSpeed
issue #7710; docs/architecture.md#platform-notes). Our explanation is an explicit first-order sweep
anyway, so the step is ordinary training to DeepSpeed.

Data: ``data.batch_size`` is the global batch; each rank loads ``batch_size / world_size`` images of
every global batch (`ShardedEpochSampler`), so one optimiser step sees exactly the images a single
process would, and the step's gradient is the same mean.

Gradient clipping stays where a single process has it: after the gradients are averaged over ranks
and accumulated over micro-batches, before the optimiser. Under DDP that is ``param.grad``; under
ZeRO-1/2 each rank holds only its slice of the flat averaged gradient, so AGC's per-unit norms and
the global norm are summed over slices with one all-reduce (`_ZeroPartitionClipper`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from e2kd_fast.engine.ddp import DDPStrategy
from e2kd_fast.engine.process_group import DistEnv
from e2kd_fast.engine.strategy import GradClipping, ObjectiveModule, SingleProcessStrategy, Strategy
from e2kd_fast.engine.zero import DeepSpeedStrategy


def make_strategy(
    cfg,
    env: DistEnv,
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    forward_to_loss: Callable[..., dict[str, Tensor]],
    device: torch.device,
    *,
    agc: bool,
    extra: nn.Module | None = None,
) -> Strategy:
    """The strategy ``cfg.engine.strategy`` names, around ``student`` and ``optimizer``.

    Args:
        cfg: the run's `Config`.
        env, device: from `setup_distributed`.
        forward_to_loss: ``(images, labels, step, frozen) → loss dict``, run inside the wrapped forward.
        agc: whether AGC applies (B-cos students with ``optim.agc``).
        extra: trainable modules of the objective (see `ObjectiveModule`), or None.
    """
    engine, world = cfg.engine, env.world_size
    if cfg.data.batch_size % world:
        raise ValueError(
            f"data.batch_size ({cfg.data.batch_size}) is the global batch and must split evenly across the "
            f"{world} processes of this launch"
        )
    clipping = GradClipping(agc, cfg.optim.agc_clip, cfg.optim.agc_eps, cfg.optim.grad_clip_norm)
    module = ObjectiveModule(student, forward_to_loss, extra)
    # fp16: a dynamic loss scale (the config refuses fp16 under DeepSpeed, which has its own).
    scaler = torch.amp.GradScaler(device.type) if cfg.train.precision == "fp16" else None
    if engine.strategy == "single":
        return SingleProcessStrategy(env, module, optimizer, clipping, scaler)
    if engine.strategy == "ddp":
        return DDPStrategy(
            env,
            module,
            optimizer,
            clipping,
            scaler,
            device=device,
            find_unused_parameters=engine.find_unused_parameters,
        )
    return DeepSpeedStrategy(
        env,
        module,
        optimizer,
        clipping,
        global_batch=cfg.data.batch_size,
        grad_accum=cfg.train.grad_accum,
        zero_stage=engine.zero_stage,
        extra=engine.deepspeed_config,
    )


__all__ = ["make_strategy"]
