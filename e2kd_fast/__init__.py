"""e2kd-fast: explanation-enhanced knowledge distillation (e²KD), exact to the method and fast.

Submodules:
    nn         B-cos layers, no-bias norms, the [x, 1 − x] encoding, explanation mode, activation checkpointing
    models     the model zoo (`create_model`, `list_models`) and checkpoint loading
    explain    dynamic weights (autograd reference and explicit sweep), GradCAM, contribution maps, pictures
    reference  the maths in plain PyTorch, the spec for every fast path
    ops        registered e2kd:: ops (reference, Triton, C++/CUDA implementations; `ops.backends` chooses)
    distill    the e²KD objective, KD, the feature baselines (AT, NST, AB, CAT-KD, ReviewKD), multi-label KD
    xdistill   XDistillation (superpixel explanations, autoencoders, fused student)
    data       image folders, VOC, Waterbirds, splits, transforms, DALI pipelines, frozen stores, synthetic data
    engine     the (compiled) training step, trainer, single/DDP/DeepSpeed back ends, evaluation, logging
    metrics    localisation, shift equivariance, distance correlation, UniCAM with FSS/RS
    report     the HTML/markdown comparison of runs (`e2kd-fast report`)
    config     run configuration (frozen dataclasses, YAML)
Command line: ``e2kd-fast`` (``python -m e2kd_fast``); the demo: ``python -m e2kd_fast.demo``.

The names below are loaded on first use: ``import e2kd_fast`` alone imports no torch, so that the
command line answers ``--help`` and ``--version`` at once.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name → the module that defines it (a submodule is its own entry).
_LAZY: dict[str, str] = {
    "explain": "e2kd_fast.explain",
    "models": "e2kd_fast.models",
    "nn": "e2kd_fast.nn",
    "reference": "e2kd_fast.reference",
    "build_config": "e2kd_fast._ext",
    "extension_available": "e2kd_fast._ext",
    "contribution_map": "e2kd_fast.explain",
    "dynamic_weights": "e2kd_fast.explain",
    "explanation_to_rgba": "e2kd_fast.explain",
    "create_model": "e2kd_fast.models",
    "list_models": "e2kd_fast.models",
    "load_checkpoint": "e2kd_fast.models",
    "save_checkpoint": "e2kd_fast.models",
    "AddInverse": "e2kd_fast.nn",
    "explanation_mode": "e2kd_fast.nn",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'e2kd_fast' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if module_name == f"e2kd_fast.{name}" else getattr(module, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
