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
"""

from e2kd_fast import explain, models, nn, reference
from e2kd_fast._ext import build_config, extension_available
from e2kd_fast.explain import contribution_map, dynamic_weights, explanation_to_rgba
from e2kd_fast.models import create_model, list_models, load_checkpoint, save_checkpoint
from e2kd_fast.nn import AddInverse, explanation_mode

__version__ = "0.1.0"

__all__ = [
    "AddInverse",
    "build_config",
    "contribution_map",
    "create_model",
    "dynamic_weights",
    "explain",
    "explanation_mode",
    "explanation_to_rgba",
    "extension_available",
    "list_models",
    "load_checkpoint",
    "models",
    "nn",
    "reference",
    "save_checkpoint",
]
