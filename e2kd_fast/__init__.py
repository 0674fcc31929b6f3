"""e2kd-fast: explanation-enhanced knowledge distillation (e²KD), exact to the method and fast.

Submodules:
    nn         B-cos layers, no-bias norms, the [x, 1 − x] encoding, explanation mode
    models     the model zoo (`create_model`, `list_models`) and checkpoint loading
    explain    dynamic weights (B-cos explanations), contribution maps, pictures
    reference  the maths in plain PyTorch, the spec for every fast path
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
