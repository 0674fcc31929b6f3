"""The distribution strategy's contract, and the single-process strategy that is also its base.

The trainer talks to every strategy (one process, DDP, DeepSpeed ZeRO-1/2) through the same `Strategy`
methods: forward, backward, optimiser step, reductions of logged values, and checkpoint state in the
trainer's own format. What a strategy wraps is an `ObjectiveModule`: the student as its only child,
and a ``forward`` that runs the whole forward-to-loss function (teacher, explanations, KD and cosine
terms), so that DDP and DeepSpeed see the loss computed inside the wrapped forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from e2kd_fast.engine.optim import adaptive_clip_grad_
from e2kd_fast.engine.process_group import DistEnv


class NonFiniteGradientError(RuntimeError):
    """The step's gradient holds an inf or a NaN: the optimiser was not applied, the weights are unchanged."""


def gradients_are_finite(grads: list[Tensor]) -> bool:
    """Whether every element of ``grads`` is finite, with one fused check and one device sync.

    An inf or NaN anywhere makes its tensor's norm non-finite; the per-tensor norms come from one
    `torch._foreach_norm` and are checked together, so the step waits for the device once, not once
    per tensor.
    """
    if not grads:
        return True
    norms = torch._foreach_norm(grads)
    return bool(torch.stack([n.to(torch.float32) for n in norms]).isfinite().all())


class ObjectiveModule(nn.Module):
    """Student plus objective: ``forward(images, labels, step, frozen)`` returns the loss dict.

    The student is the registered child (with ``extra``, an objective's own trainable modules such as a
    feature baseline's connectors, so that DDP / DeepSpeed reduce their gradients too); the teacher
    and the objective's code live in ``forward_to_loss`` (a plain callable).
    """

    def __init__(
        self,
        student: nn.Module,
        forward_to_loss: Callable[..., dict[str, Tensor]],
        extra: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.student = student
        self.extra = extra
        self._forward_to_loss = forward_to_loss

    def forward(self, images: Tensor, labels: Tensor | None, step: int, frozen: Any = None) -> dict[str, Tensor]:
        """images [N, C, H, W] (this rank's micro-batch) → {"loss": scalar, ...}; N = 0 → `empty_loss` alone."""
        if images.shape[0] == 0:
            return {"loss": self.empty_loss()}
        return self._forward_to_loss(images, labels, step, frozen)

    def empty_loss(self) -> Tensor:
        """A zero loss that depends on every trainable parameter: what a micro-batch without images adds.

        Its backward gives each parameter an exact zero gradient, so DDP's and DeepSpeed's gradient
        hooks fire on this rank as on the others and it joins the same all-reduces. The model is not
        run: on zero images a B-cos network returns a NaN loss and writes NaN into the BatchNorm
        running variances.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        return sum((p.sum() for p in params), torch.zeros(())) * 0.0


@dataclass(frozen=True)
class GradClipping:
    """Clipping applied to the averaged, accumulated gradient before the optimiser (AGC first)."""

    agc: bool = False
    agc_clip: float = 0.01
    agc_eps: float = 1e-3
    max_norm: float | None = None


class Strategy:
    """One process: the base of every strategy (and the ``single`` strategy itself).

    Args:
        env: this process's place in the launch.
        module: the `ObjectiveModule` to train.
        optimizer: the optimiser over the student's trainable parameters.
        clipping: gradient clipping applied before each optimiser step.
        scaler: the dynamic loss scale of fp16 training (``train.precision: fp16``), or None.
    """

    name = "single"

    def __init__(
        self,
        env: DistEnv,
        module: ObjectiveModule,
        optimizer: torch.optim.Optimizer,
        clipping: GradClipping,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.env, self.module, self.optimizer, self.clipping = env, module, optimizer, clipping
        self.scaler = scaler
        self.wrapped: nn.Module = module

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    @property
    def world_size(self) -> int:
        return self.env.world_size

    def forward(self, images: Tensor, labels: Tensor | None, step: int, frozen: Any, *, last_micro: bool):
        """The loss dict of this rank's micro-batch; ``last_micro``: the last micro-batch of the step."""
        return self.wrapped(images, labels, step, frozen)

    def backward(self, loss: Tensor, micro_batches: int) -> None:
        """Accumulates the gradient of ``loss / micro_batches`` (the step's mean over micro-batches);
        with fp16, of that times the loss scale."""
        loss = loss / micro_batches
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self) -> bool:
        """Clips the accumulated gradient, applies the optimiser, clears the gradient.

        AGC applies to the student's parameters; the global-norm clip also covers the objective's own
        (``module.extra``: a feature baseline's connectors). With a loss scale (fp16) the gradient is
        unscaled first, and a gradient with inf or NaN skips the update and halves the scale, as
        `torch.amp.GradScaler` does: fp16 gradients overflow now and then by design.

        Returns:
            whether the update was applied (False only for a skipped fp16 step).

        Raises:
            NonFiniteGradientError: without a loss scale, the gradient holds inf or NaN (nothing applied).
        """
        params = [p for p in self.module.student.parameters() if p.grad is not None]
        extra_grads = [] if self.module.extra is None else [p.grad for p in self.module.extra.parameters()]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if not gradients_are_finite([p.grad for p in params] + [g for g in extra_grads if g is not None]):
            # Under DDP every rank holds the same averaged gradient, so all of them decide alike.
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()  # unscale_ recorded the overflow: the scale is lowered
                return False
            raise NonFiniteGradientError("the accumulated gradient holds inf or NaN; the optimiser was not applied")
        if self.clipping.agc:
            adaptive_clip_grad_(params, self.clipping.agc_clip, self.clipping.agc_eps)
        if self.clipping.max_norm is not None:
            extra = [] if self.module.extra is None else list(self.module.extra.parameters())
            torch.nn.utils.clip_grad_norm_(params + [p for p in extra if p.grad is not None], self.clipping.max_norm)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)  # already unscaled and checked: applies the update
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def scale_gradients(self, factor: float) -> None:
        """Multiplies the accumulated gradient by ``factor``; call after the last backward of a step, before `step`.

        The trainer uses it to turn the gradient of a step whose micro-batches lost unreadable images
        into the mean over the images actually used.
        """
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, factor)

    def skip_step(self) -> None:
        """Ends an optimiser step without applying it (no rank had an image): the gradient is dropped,
        weights and optimiser state stay as they are. Every rank must call it for the same step."""
        self.optimizer.zero_grad(set_to_none=True)

    def reduce_sum(self, values: list[float]) -> list[float]:
        """Sums of ``values`` over ranks, in float64 with one all-reduce (identity for one process).

        Every rank must pass a list of the same length, in the same order.
        """
        if self.world_size == 1 or not values:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean of logged scalars over ranks (identity for one process)."""
        if self.world_size == 1 or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist(), strict=True)}

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order, on every rank (``[obj]`` for one process).

        Used to put together the shares of a split evaluation (`e2kd_fast.engine.evaluate.evaluate`).
        """
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    @contextmanager
    def main_rank_buffers(self) -> Iterator[None]:
        """Rank 0's student buffers (BatchNorm running statistics) on every rank for the duration; each
        rank's own again afterwards. Collective on entry.

        The parameters are the same on every rank, the buffers are not: each rank's training forward
        updates the running statistics with its own images (DDP broadcasts rank 0's at the start of
        the next forward, DeepSpeed not at all). A split evaluation thus runs the model the checkpoint
        holds (rank 0's), and training goes on exactly as without it.
        """
        buffers = list(self.module.student.buffers())
        if self.world_size == 1 or not buffers:
            yield
            return
        own = [b.detach().clone() for b in buffers]
        with torch.no_grad():
            for b in buffers:
                dist.broadcast(b, src=0)
        try:
            yield
        finally:
            with torch.no_grad():
                for b, saved in zip(buffers, own, strict=True):
                    b.copy_(saved)

    def any_rank(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag OR-ed over ranks (one small all-reduce; none for one process), so that every rank
        takes the same branch, e.g. stopping on a signal that reached one rank first."""
        if self.world_size == 1:
            return tuple(bool(f) for f in flags)
        t = torch.tensor([float(f) for f in flags], dtype=torch.float32, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def model_state(self) -> dict[str, Tensor]:
        """The student's full state dict (fp32 where training keeps fp32 masters). Collective."""
        return self.module.student.state_dict()

    def optimizer_state(self) -> dict:
        """The optimiser state in `torch.optim.Optimizer.state_dict` format over the student's
        trainable parameters, whole (not partitioned). Collective: every rank must call it."""
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict, model_state: dict[str, Tensor] | None = None) -> None:
        """Loads `optimizer_state`'s format; call after the weights were loaded into the student.

        ``model_state``: the weights just loaded (fp32), for strategies that keep separate master copies.
        """
        self.optimizer.load_state_dict(state)

    def scaler_state(self) -> dict | None:
        """The fp16 loss scale's state (`torch.amp.GradScaler.state_dict`), or None without one."""
        return None if self.scaler is None else self.scaler.state_dict()

    def load_scaler_state(self, state: dict | None) -> None:
        """Restores `scaler_state`; None (a checkpoint from a run without fp16) starts a fresh scale."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)

    def _comm_device(self) -> torch.device:
        return (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        )


SingleProcessStrategy = Strategy


class StateDictView:
    """Stands in for a model in `save_checkpoint`: its name, and a state dict given from outside."""

    def __init__(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        self.e2kd_name = getattr(model, "e2kd_name", None)
        self._state = state

    def state_dict(self) -> dict[str, Tensor]:
        return self._state


__all__ = [
    "GradClipping",
    "NonFiniteGradientError",
    "ObjectiveModule",
    "SingleProcessStrategy",
    "StateDictView",
    "Strategy",
    "gradients_are_finite",
]
