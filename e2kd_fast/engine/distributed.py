"""Distribution back ends: one process, DDP, and DeepSpeed ZeRO-1/2.

A launch (``torchrun``, ``deepspeed``, or a test spawning processes) runs one process per device and
tells each its place through environment variables: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``. `setup_distributed` reads them and starts the process group (nccl
on CUDA, gloo on CPU); `make_backend` then wraps the student in the back end ``engine.backend``
names. The trainer talks to every back end through the same `DistributedBackend` methods: forward,
backward, optimiser step, reductions of logged values, and checkpoint state in the trainer's own
format.

What is wrapped is an `ObjectiveModule`: the student as its only child, and a ``forward`` that runs
the whole forward-to-loss function (teacher, explanations, KD and cosine terms). DeepSpeed must see
the explanation and the loss computed inside the wrapped module's forward: since v0.18.3 it hooks
every output of ``engine(...)``, and an explanation taken by ``autograd.grad`` on such an output
starts its reduction epilogue early (``IndexError`` in ``reduce_ipg_grads`` under ZeRO-1/2; see
spec/platform_notes.md section 9.5). Our explanation is an explicit first-order sweep anyway, so the
step is ordinary training to DeepSpeed.

Data: ``data.batch_size`` is the global batch; each rank loads ``batch_size / world_size`` images of
every global batch (`ShardedEpochSampler`), so one optimiser step sees exactly the images a single
process would, and the step's gradient is the same mean.

Gradient clipping stays where a single process has it: after the gradients are averaged over ranks
and accumulated over micro-batches, before the optimiser. Under DDP that is ``param.grad``; under
ZeRO-1/2 each rank holds only its slice of the flat averaged gradient, so AGC's per-unit norms and
the global norm are summed over slices with one all-reduce (`_ZeroPartitionClipper`).
"""

from __future__ import annotations

import importlib
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from e2kd_fast.config import deep_merge
from e2kd_fast.engine.optim import _unitwise_norm, adaptive_clip_grad_
from e2kd_fast.engine.sampling import EpochSampler

__all__ = [
    "DDPBackend",
    "DeepSpeedBackend",
    "DistEnv",
    "DistributedBackend",
    "GradClipping",
    "NullMetricsLogger",
    "ObjectiveModule",
    "ShardedEpochSampler",
    "SingleBackend",
    "StateDictView",
    "dist_env",
    "find_free_port",
    "make_backend",
    "setup_distributed",
    "shutdown_distributed",
]


# ----------------------------------------------------------------------------------------------------------------------
# Process group
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the launch."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(environ: dict[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(
            f"environment variable {name}={raw!r} is not an integer (set by torchrun / deepspeed)"
        ) from None


def dist_env(environ: dict[str, str] | None = None) -> DistEnv:
    """Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (defaults: one process)."""
    environ = dict(os.environ if environ is None else environ)
    env = DistEnv(
        rank=_env_int(environ, "RANK", 0),
        world_size=_env_int(environ, "WORLD_SIZE", 1),
        local_rank=_env_int(environ, "LOCAL_RANK", 0),
    )
    if env.world_size < 1 or not 0 <= env.rank < env.world_size or env.local_rank < 0:
        raise ValueError(
            f"inconsistent launch variables: RANK={env.rank}, WORLD_SIZE={env.world_size}, "
            f"LOCAL_RANK={env.local_rank}; expected 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0"
        )
    return env


def find_free_port() -> int:
    """A TCP port free on this host right now (for single-host launches and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _dist_backend_name(name: str, device: torch.device) -> str:
    if name == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if name == "nccl" and device.type != "cuda":
        raise ValueError(f"engine.dist_backend 'nccl' needs CUDA devices, but the run uses {device.type}; use 'gloo'")
    return name


def _patch_deepspeed_shm() -> None:
    """Stops DeepSpeed's CPU accelerator from JIT-building its shared-memory all-reduce (~30 s at start).

    ``deepspeed.comm.torch`` must be fetched with importlib: ``deepspeed.comm`` re-exports ``torch``,
    so ``import deepspeed.comm.torch`` would bind the real torch module (platform_notes.md 9.3).
    """
    module = importlib.import_module("deepspeed.comm.torch")
    if hasattr(module, "build_shm_op"):
        module.build_shm_op = lambda: None


def setup_distributed(engine_cfg, device: torch.device) -> tuple[DistEnv, torch.device]:
    """Starts the process group the launch describes, and picks this rank's device.

    With ``engine.backend: single`` nothing is started (and a multi-process launch is an error). With
    ``ddp`` or ``deepspeed`` and no launcher, a one-process group on a free local port is started, so
    that the same config runs on a laptop.

    Args:
        engine_cfg: the `EngineConfig`.
        device: the device `train.device` resolves to; CUDA becomes ``cuda:LOCAL_RANK``.

    Returns:
        (the process's `DistEnv`, its device).
    """
    env = dist_env()
    if engine_cfg.backend == "single":
        if env.world_size > 1:
            raise ValueError(
                f"engine.backend is 'single' but the launcher started {env.world_size} processes (WORLD_SIZE); "
                "set engine.backend to 'ddp' or 'deepspeed', or launch one process"
            )
        return env, device
    if device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    if engine_cfg.backend == "deepspeed":
        os.environ.setdefault("LOCAL_SIZE", str(env.world_size))  # the CPU accelerator's device count
        _patch_deepspeed_shm()
    if not dist.is_initialized():
        if env.world_size == 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(find_free_port()))
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise ValueError(
                    f"WORLD_SIZE={env.world_size} but {name} is not set; launch with torchrun or deepspeed"
                )
        dist.init_process_group(
            _dist_backend_name(engine_cfg.dist_backend, device),
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(minutes=engine_cfg.timeout_minutes),
        )
    if engine_cfg.backend == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    return env, device


def shutdown_distributed() -> None:
    """Destroys the process group if one was started (end of a run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------------
# Data sharding
# ----------------------------------------------------------------------------------------------------------------------


class ShardedEpochSampler(EpochSampler):
    """This rank's share of `EpochSampler`'s epoch: positions ``start + rank``, ``+ world_size``, ...

    The epoch's order and seeds are those of the unsharded sampler. With per-rank batches of
    ``B / world_size`` (drop_last), local batch ``j`` of all ranks together covers global positions
    ``[start + j·B, start + (j+1)·B)``: the same images as the single-process batch ``j``. The tail
    of an epoch that does not fill an optimiser step is left out, as a single process leaves it out
    (``drop_last``); nothing is padded or doubled.

    Args:
        indices, seed, shuffle: as `EpochSampler`.
        rank, world_size: this process's place.
    """

    def __init__(self, indices: Tensor, seed: int, shuffle: bool = True, *, rank: int = 0, world_size: int = 1):
        super().__init__(indices, seed, shuffle=shuffle)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """``start``: global positions already consumed, a multiple of ``world_size``."""
        if start % self.world_size:
            raise ValueError(f"start={start} is not a multiple of world_size={self.world_size}")
        super().set_epoch(epoch, start)

    def __len__(self) -> int:
        remaining = max(len(self.indices) - self.start - self.rank, 0)
        return (remaining + self.world_size - 1) // self.world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return islice(super().__iter__(), self.rank, None, self.world_size)


# ----------------------------------------------------------------------------------------------------------------------
# The wrapped module and the back ends
# ----------------------------------------------------------------------------------------------------------------------


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
        """images [N, C, H, W] (this rank's micro-batch) → {"loss": scalar, ...}."""
        return self._forward_to_loss(images, labels, step, frozen)


@dataclass(frozen=True)
class GradClipping:
    """Clipping applied to the averaged, accumulated gradient before the optimiser (AGC first)."""

    agc: bool = False
    agc_clip: float = 0.01
    agc_eps: float = 1e-3
    max_norm: float | None = None


class DistributedBackend:
    """One process: the base of every back end (and the ``single`` back end itself).

    Args:
        env: this process's place in the launch.
        module: the `ObjectiveModule` to train.
        optimizer: the optimiser over the student's trainable parameters.
        clipping: gradient clipping applied before each optimiser step.
    """

    name = "single"

    def __init__(
        self, env: DistEnv, module: ObjectiveModule, optimizer: torch.optim.Optimizer, clipping: GradClipping
    ) -> None:
        self.env, self.module, self.optimizer, self.clipping = env, module, optimizer, clipping
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
        """Accumulates the gradient of ``loss / micro_batches`` (the step's mean over micro-batches)."""
        (loss / micro_batches).backward()

    def step(self) -> None:
        """Clips the accumulated gradient, applies the optimiser, clears the gradient.

        AGC applies to the student's parameters; the global-norm clip also covers the objective's own
        (``module.extra``: a feature baseline's connectors).
        """
        params = [p for p in self.module.student.parameters() if p.grad is not None]
        if self.clipping.agc:
            adaptive_clip_grad_(params, self.clipping.agc_clip, self.clipping.agc_eps)
        if self.clipping.max_norm is not None:
            extra = [] if self.module.extra is None else list(self.module.extra.parameters())
            torch.nn.utils.clip_grad_norm_(params + [p for p in extra if p.grad is not None], self.clipping.max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean of logged scalars over ranks (identity for one process)."""
        if self.world_size == 1 or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist(), strict=True)}

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (e.g. evaluation metrics computed on rank 0 only)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

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

        ``model_state``: the weights just loaded (fp32), for back ends that keep separate master copies.
        """
        self.optimizer.load_state_dict(state)

    def _comm_device(self) -> torch.device:
        return (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        )


SingleBackend = DistributedBackend


class DDPBackend(DistributedBackend):
    """torch DistributedDataParallel: gradients averaged over ranks during the backward.

    Under gradient accumulation only the last micro-batch's backward all-reduces (``no_sync`` for
    the others). Buffers (BatchNorm running statistics) are broadcast from rank 0 at every forward;
    batch statistics are per rank (per ``B / world_size`` images), as in every DDP run.
    """

    name = "ddp"

    def __init__(self, env, module, optimizer, clipping, *, device: torch.device, find_unused_parameters=False):
        super().__init__(env, module, optimizer, clipping)
        from torch.nn.parallel import DistributedDataParallel

        self.wrapped = DistributedDataParallel(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
        )

    def forward(self, images, labels, step, frozen, *, last_micro: bool):
        # What `no_sync()` sets: DDP reads it in forward to decide whether this backward all-reduces.
        self.wrapped.require_backward_grad_sync = last_micro
        return self.wrapped(images, labels, step, frozen)


def deepspeed_config(
    *, global_batch: int, world_size: int, grad_accum: int, zero_stage: int, extra: dict | None = None
) -> dict:
    """The DeepSpeed JSON config a run's settings describe (``extra`` merged over it).

    DeepSpeed's ``bf16`` mode (bf16 working weights) stays off: the backward of the B-cos ops fails on
    bf16 weights with fp32 activations ("expected scalar type BFloat16 but found Float", measured on
    CPU). ``train.precision: bf16`` is the trainer's autocast (CUDA) with fp32 weights, as under DDP.
    """
    config = {
        "train_batch_size": global_batch * grad_accum,
        "train_micro_batch_size_per_gpu": global_batch // world_size,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": {"stage": zero_stage},
        # Our client optimiser (torch Adam/AdamW/SGD): no FusedAdam JIT build (platform_notes.md 9.3).
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
        "gradient_clipping": 0.0,  # clipping is ours, on the averaged partitions (see _ZeroPartitionClipper)
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return deep_merge(config, extra or {})


class _ZeroPartitionLayout:
    """Where each trainable parameter lies in this rank's partition of ZeRO-1/2's flat buffer.

    ``slices`` holds ``(param index, param offset, partition offset, length)``: elements
    ``param.view(-1)[p: p + n]`` are ``partition[f: f + n]``. Parameters are laid out in the order of
    the optimiser's single parameter group, at DeepSpeed's per-parameter offsets (alignment padding).
    """

    def __init__(self, zero_opt, params: list[nn.Parameter], rank: int) -> None:
        if len(zero_opt.bit16_groups) != 1:
            raise RuntimeError(f"expected one parameter group in the ZeRO optimiser, got {len(zero_opt.bit16_groups)}")
        group = zero_opt.round_robin_bit16_groups[0]
        if len(group) != len(params) or any(a is not b for a, b in zip(group, params, strict=True)):
            raise RuntimeError(
                "DeepSpeed reordered the parameters (round_robin_gradients?); the checkpoint/clipping layout "
                "expects the optimiser's order"
            )
        offsets = getattr(zero_opt, "round_robin_bit16_offsets", None)
        if offsets is not None:
            offsets = list(offsets[0])
        else:  # before per-parameter padding existed the parameters were packed back to back
            offsets = [sum(p.numel() for p in params[:i]) for i in range(len(params))]
        self.size = int(zero_opt.partition_size[0])
        lo, hi = rank * self.size, (rank + 1) * self.size
        self.slices: list[tuple[int, int, int, int]] = []
        for i, (p, off) in enumerate(zip(params, offsets, strict=True)):
            a, b = max(lo, off), min(hi, off + p.numel())
            if a < b:
                self.slices.append((i, a - off, a - lo, b - a))
        self.offsets = offsets


def _unit_ids(shape: torch.Size) -> Tensor:
    """[numel] id of the AGC unit (as `adaptive_clip_grad_` groups them) of every element."""
    norm_shape = _unitwise_norm(torch.zeros(shape, device="meta")).shape
    n = max(int(torch.Size(norm_shape).numel()), 1)
    return torch.arange(n).reshape(norm_shape).expand(shape).reshape(-1)


class _ZeroPartitionClipper:
    """AGC and global-norm clipping on ZeRO-1/2's partitioned gradient, equal to clipping whole grads.

    Each rank sums squares of its slices per AGC unit (gradient and fp32 master weight) and of the
    whole gradient; one all-reduce completes them; each rank then scales its own slices.
    """

    def __init__(self, layout: _ZeroPartitionLayout, params: list[nn.Parameter], clipping: GradClipping, device):
        self.layout, self.clipping = layout, clipping
        counts = [int(_unit_ids(p.shape).max()) + 1 if clipping.agc else 0 for p in params]
        self.num_units = sum(counts)
        bases = [sum(counts[:i]) for i in range(len(counts))]
        self.ids = []
        if clipping.agc:
            for i, p_off, _, n in layout.slices:
                self.ids.append((_unit_ids(params[i].shape)[p_off : p_off + n] + bases[i]).to(device))

    @torch.no_grad()
    def __call__(self, grad: Tensor, master: Tensor) -> None:
        """Clips ``grad`` [partition size] in place; ``master`` [partition size]: fp32 weights."""
        c, slices = self.clipping, self.layout.slices
        if c.agc:
            sums = torch.zeros(2, self.num_units, dtype=torch.float32, device=grad.device)
            for ids, (_, _, f, n) in zip(self.ids, slices, strict=True):
                sums[0].index_add_(0, ids, grad[f : f + n].float().square())
                sums[1].index_add_(0, ids, master[f : f + n].float().square())
            dist.all_reduce(sums)
            grad_norm, weight_norm = sums.sqrt()
            max_norm = weight_norm.clamp(min=c.agc_eps) * c.agc_clip
            factor = torch.where(grad_norm < max_norm, 1.0, max_norm / grad_norm.clamp(min=1e-6))
            for ids, (_, _, f, n) in zip(self.ids, slices, strict=True):
                grad[f : f + n].mul_(factor[ids].to(grad.dtype))
        if c.max_norm is not None:
            total = torch.zeros(1, dtype=torch.float32, device=grad.device)
            for _, _, f, n in slices:
                total += grad[f : f + n].float().square().sum()
            dist.all_reduce(total)
            grad.mul_((c.max_norm / (total.sqrt() + 1e-6)).clamp(max=1.0).to(grad.dtype))


class DeepSpeedBackend(DistributedBackend):
    """DeepSpeed ZeRO stage 1 or 2 with the client optimiser (fp32 weights; bf16 is the trainer's autocast).

    ``engine.backward`` and ``engine.step`` run after every micro-batch (DeepSpeed applies the optimiser
    at its accumulation boundary; skipping ``step`` on the others gives wrong parameters,
    platform_notes.md 9.4). Checkpoints are written in the trainer's format: weights whole (from the
    fp32 masters), optimiser state gathered from the partitions into per-parameter tensors, so a
    DeepSpeed run resumes under single/DDP and the other way round.
    """

    name = "deepspeed"

    def __init__(self, env, module, optimizer, clipping, *, global_batch, grad_accum, zero_stage, extra=None):
        super().__init__(env, module, optimizer, clipping)
        import deepspeed

        if len(optimizer.param_groups) != 1:
            raise ValueError(
                f"the DeepSpeed back end expects one optimiser parameter group, got {len(optimizer.param_groups)}"
            )
        self.params = list(optimizer.param_groups[0]["params"])  # ZeRO's flat order
        self.names = {id(p): n for n, p in module.student.named_parameters()}
        config = deepspeed_config(
            global_batch=global_batch,
            world_size=env.world_size,
            grad_accum=grad_accum,
            zero_stage=zero_stage,
            extra=extra,
        )
        self.engine, self.zero_opt, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=config, dist_init_required=False
        )
        self.wrapped = self.engine
        self.layout = _ZeroPartitionLayout(self.zero_opt, self.params, env.rank)
        self.clipper = _ZeroPartitionClipper(self.layout, self.params, clipping, self._master().device)
        original = self.zero_opt.unscale_and_clip_grads

        def clip_then_unscale(grad_groups_flat, total_norm):
            # Called once per group in ZeRO's step, on this rank's averaged gradient partition.
            (grad,) = grad_groups_flat
            self.clipper(grad, self._master())
            return original(grad_groups_flat, total_norm)

        self.zero_opt.unscale_and_clip_grads = clip_then_unscale

    def _master(self) -> Tensor:
        return self.zero_opt.single_partition_of_fp32_groups[0]

    def backward(self, loss: Tensor, micro_batches: int) -> None:
        self.engine.backward(loss)  # divides by gradient_accumulation_steps itself
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # bookkeeping only; the optimiser runs at the boundary

    def step(self) -> None:
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeed is not at its accumulation boundary: a micro-batch was skipped on this rank")
        self.engine.step()

    # ---------------------------------------------------------------- checkpoints

    def _gather_flat(self, local: Tensor) -> Tensor:
        """This rank's partition [P] → the whole flat buffer [world_size · P] (collective)."""
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)

    def _unflatten(self, flat: Tensor) -> list[Tensor]:
        return [
            flat[off : off + p.numel()].view(p.shape).detach().cpu().clone()
            for p, off in zip(self.params, self.layout.offsets, strict=True)
        ]

    def model_state(self) -> dict[str, Tensor]:
        state = self.module.student.state_dict()
        weights = self._unflatten(self._gather_flat(self._master().detach()))
        for p, w in zip(self.params, weights, strict=True):
            if id(p) in self.names:  # objective-owned parameters (connectors) are not the student's
                state[self.names[id(p)]] = w  # from the fp32 masters
        return state

    def optimizer_state(self) -> dict:
        base = self.zero_opt.optimizer
        (group,) = base.param_groups
        flat_state = base.state.get(self._master(), {})
        per_param: list[dict[str, Any]] = [{} for _ in self.params]
        for key in sorted(flat_state):
            value = flat_state[key]
            if isinstance(value, Tensor) and value.numel() == self.layout.size:
                for entry, t in zip(per_param, self._unflatten(self._gather_flat(value)), strict=True):
                    entry[key] = t
            else:  # per-parameter scalars (Adam's step) are the same for the whole flat partition
                for entry in per_param:
                    entry[key] = value.detach().cpu().clone() if isinstance(value, Tensor) else value
        hyper = {k: v for k, v in group.items() if k != "params"}
        state = {i: entry for i, entry in enumerate(per_param) if entry}
        return {"state": state, "param_groups": [{**hyper, "params": list(range(len(self.params)))}]}

    @torch.no_grad()
    def load_optimizer_state(self, state: dict, model_state: dict[str, Tensor] | None = None) -> None:
        base, master = self.zero_opt.optimizer, self._master()
        (group,) = base.param_groups
        (saved_group,) = state["param_groups"]
        if len(saved_group["params"]) != len(self.params):
            raise ValueError(
                f"the checkpoint's optimiser has {len(saved_group['params'])} parameters, this student "
                f"{len(self.params)}"
            )
        for key, value in saved_group.items():
            if key != "params":
                group[key] = value
        # The fp32 masters from the saved weights, then every rank's working copy from them.
        for i, p_off, f, n in self.layout.slices:
            p = self.params[i]
            name = self.names.get(id(p))
            source = model_state.get(name) if model_state is not None and name is not None else None
            source = p if source is None else source
            master[f : f + n].copy_(source.reshape(-1)[p_off : p_off + n].to(master.dtype))
        saved = {int(k): v for k, v in state["state"].items()}
        flat_state: dict[str, Any] = {}
        if saved:
            keys = set().union(*(entry.keys() for entry in saved.values()))
            for key in sorted(keys):
                sample = next(entry[key] for entry in saved.values() if key in entry)
                if isinstance(sample, Tensor) and sample.dim() > 0:
                    flat = torch.zeros_like(master)
                    for i, p_off, f, n in self.layout.slices:
                        if i in saved and key in saved[i]:
                            flat[f : f + n].copy_(saved[i][key].reshape(-1)[p_off : p_off + n].to(flat.dtype))
                    flat_state[key] = flat
                else:
                    flat_state[key] = sample.clone() if isinstance(sample, Tensor) else sample
        base.state[master] = flat_state
        self.zero_opt.update_lp_params()  # every rank's working weights from the masters (all-gather)


def make_backend(
    cfg,
    env: DistEnv,
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    forward_to_loss: Callable[..., dict[str, Tensor]],
    device: torch.device,
    *,
    agc: bool,
    extra: nn.Module | None = None,
) -> DistributedBackend:
    """The back end ``cfg.engine.backend`` names, around ``student`` and ``optimizer``.

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
    if engine.backend == "single":
        return SingleBackend(env, module, optimizer, clipping)
    if engine.backend == "ddp":
        return DDPBackend(
            env, module, optimizer, clipping, device=device, find_unused_parameters=engine.find_unused_parameters
        )
    return DeepSpeedBackend(
        env,
        module,
        optimizer,
        clipping,
        global_batch=cfg.data.batch_size,
        grad_accum=cfg.train.grad_accum,
        zero_stage=engine.zero_stage,
        extra=engine.deepspeed_config,
    )


class StateDictView:
    """Stands in for a model in `save_checkpoint`: its name, and a state dict given from outside."""

    def __init__(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        self.e2kd_name = getattr(model, "e2kd_name", None)
        self._state = state

    def state_dict(self) -> dict[str, Tensor]:
        return self._state


class NullMetricsLogger:
    """What ranks other than 0 log to: nothing (rank 0 writes metrics.jsonl and TensorBoard)."""

    def log(self, kind: str, step: int, **values: Any) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass
