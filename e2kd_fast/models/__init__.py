"""The model zoo: `create_model(name)` / `list_models()`, and checkpoint loading.

B-cos models (6-channel input): bcos_resnet18/34/50/101/152, bcos_resnext50_32x4d,
bcos_densenet121/161/169/201, bcos_vit_{ti,s,b}_patch16_224, bcos_resnet{20,32,44,56,110}_cifar.
Standard torchvision models (RGB input, for GradCAM): resnet18/34/50, densenet121/169.
"""

# Importing the family modules registers their entrypoints.
from e2kd_fast.models import bcos_densenet, bcos_resnet, bcos_vit, standard  # noqa: F401
from e2kd_fast.models._registry import (
    ModelArgumentError,
    UnknownModelError,
    check_model_kwargs,
    create_model,
    list_models,
    model_arguments,
    model_entry,
    register_model,
)
from e2kd_fast.models.bcos_densenet import BcosDenseNet
from e2kd_fast.models.bcos_resnet import BcosResNet
from e2kd_fast.models.bcos_vit import BcosViT
from e2kd_fast.models.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    LoadReport,
    has_ema_weights,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from e2kd_fast.models.spec import ModelSpec, build_model, export_model

__all__ = [
    "BcosDenseNet",
    "BcosResNet",
    "BcosViT",
    "CheckpointError",
    "CheckpointWriteError",
    "LoadReport",
    "ModelArgumentError",
    "ModelSpec",
    "UnknownModelError",
    "build_model",
    "check_model_kwargs",
    "create_model",
    "export_model",
    "has_ema_weights",
    "list_models",
    "load_checkpoint",
    "model_arguments",
    "model_entry",
    "read_checkpoint",
    "register_model",
    "save_checkpoint",
]
