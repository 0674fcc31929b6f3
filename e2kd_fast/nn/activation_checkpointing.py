"""Activation checkpointing of a student's stages (``train.activation_checkpointing``).

A checkpointed stage keeps only its input and what the explanation sweep reads later (the B-cos
scales and unit-norm weights, the norms' 1/std); everything else its forward saved for the backward
is recomputed during the backward. Both the plain forward (``stage(x)``, KD steps) and the sweep's
taped forward are checkpointed, with non-reentrant `torch.utils.checkpoint`, which `torch.compile`
captures without a graph break.

Exactness: the recomputation replays the same random numbers (drop-path), and batch-norm running
statistics are restored after it, so a checkpointed step updates parameters *and* buffers exactly as
an ordinary one. Under ``torch.compile`` the recomputation is part of the compiled backward and
never re-runs the Python forward, so the restore is only needed eagerly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

_FLAG = "_e2kd_checkpointed"


def stage_names(model: nn.Module) -> list[str]:
    """Qualified names of the modules that form the model's stages (what gets checkpointed).

    ResNets (B-cos and torchvision): ``layer1`` … ``layer4``; DenseNets: the dense blocks and
    transitions; B-cos ViTs: each encoder block.
    """
    names = []
    for name, _ in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf.startswith(("layer", "denseblock", "transition", "encoder_")) and leaf[-1].isdigit():
            if not any(name.startswith(parent + ".") for parent in names):
                names.append(name)
    return names


def enable_activation_checkpointing(model: nn.Module) -> list[str]:
    """Checkpoints every stage of ``model`` (in place); returns the stage names.

    Raises:
        ValueError: the model has no stage this function recognises.
    """
    names = stage_names(model)
    if not names:
        raise ValueError(
            f"activation checkpointing found no stages in {type(model).__name__} (looked for ResNet layers, "
            "DenseNet blocks and transitions, ViT encoder blocks)"
        )
    for name in names:
        stage = model.get_submodule(name)
        if getattr(stage, _FLAG, False):
            continue
        setattr(stage, _FLAG, True)
        stage.forward = _checkpointed_forward(stage, stage.forward)
    return names


def is_checkpointed(module: nn.Module) -> bool:
    return getattr(module, _FLAG, False)


def run_checkpointed(module: nn.Module, fn: Callable, *args):
    """``fn(*args)`` with the activations of ``module`` recomputed in the backward (when grad is on)."""
    if not torch.is_grad_enabled():
        return fn(*args)
    if torch.compiler.is_compiling():
        return checkpoint(fn, *args, use_reentrant=False)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=lambda: _recompute_contexts(module))


def _checkpointed_forward(module: nn.Module, forward: Callable) -> Callable:
    def checkpointed(x: Tensor) -> Tensor:
        return run_checkpointed(module, forward, x)

    return checkpointed


def _recompute_contexts(module: nn.Module) -> tuple[contextlib.AbstractContextManager, ...]:
    """(forward context, recompute context): the recomputation leaves batch-norm buffers as they were."""
    return contextlib.nullcontext(), _restore_norm_buffers(module)


@contextlib.contextmanager
def _restore_norm_buffers(module: nn.Module) -> Iterator[None]:
    buffers = [b for m in module.modules() if isinstance(m, _BatchNorm) for b in m.buffers()]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.copy_(value)
