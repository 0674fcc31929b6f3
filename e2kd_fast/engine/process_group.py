"""Process groups: where this process stands in a launch, and starting and ending the group.

A launch (``torchrun``, ``deepspeed``, or a test spawning processes) runs one process per device and
tells each its place through environment variables: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``. `setup_distributed` reads them and starts the process group (nccl
on CUDA, gloo on CPU).
"""

from __future__ import annotations

import importlib
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


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


def _process_group_kind(name: str, device: torch.device) -> str:
    """``engine.process_group``: ``auto`` → nccl on CUDA, gloo on CPU."""
    if name == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if name == "nccl" and device.type != "cuda":
        raise ValueError(f"engine.process_group 'nccl' needs CUDA devices, but the run uses {device.type}; use 'gloo'")
    return name


def _patch_deepspeed_shm() -> None:
    """Stops DeepSpeed's CPU accelerator from JIT-building its shared-memory all-reduce (~30 s at start).

    ``deepspeed.comm.torch`` must be fetched with importlib: ``deepspeed.comm`` re-exports ``torch``,
    so ``import deepspeed.comm.torch`` would bind the real torch module. The build runs unconditionally
    on the CPU accelerator (in ``TorchBackend.__init__``, no switch); gloo's all-reduce is used instead.
    """
    module = importlib.import_module("deepspeed.comm.torch")
    if hasattr(module, "build_shm_op"):
        module.build_shm_op = lambda: None


def setup_distributed(engine_cfg, device: torch.device) -> tuple[DistEnv, torch.device]:
    """Starts the process group the launch describes, and picks this rank's device.

    With ``engine.strategy: single`` nothing is started (and a multi-process launch is an error). With
    ``ddp`` or ``deepspeed`` and no launcher, a one-process group on a free local port is started, so
    that the same config runs on a laptop.

    Args:
        engine_cfg: the `EngineConfig`.
        device: the device `train.device` resolves to; CUDA becomes ``cuda:LOCAL_RANK``.

    Returns:
        (the process's `DistEnv`, its device).
    """
    env = dist_env()
    if engine_cfg.strategy == "single":
        if env.world_size > 1:
            raise ValueError(
                f"engine.strategy is 'single' but the launcher started {env.world_size} processes (WORLD_SIZE); "
                "set engine.strategy to 'ddp' or 'deepspeed', or launch one process"
            )
        return env, device
    if device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    if engine_cfg.strategy == "deepspeed":
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
            _process_group_kind(engine_cfg.process_group, device),
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(minutes=engine_cfg.timeout_minutes),
        )
    if engine_cfg.strategy == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    return env, device


def shutdown_distributed() -> None:
    """Destroys the process group if one was started (end of a run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["DistEnv", "dist_env", "find_free_port", "setup_distributed", "shutdown_distributed"]
