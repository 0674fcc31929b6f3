"""Model registry: every model is reachable by name through `create_model`."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModelEntry:
    """A registered entrypoint and what callers need to know before building it."""

    name: str
    builder: Callable[..., nn.Module]
    family: str  # "bcos" (6-channel input, B-cos explanations) or "standard" (RGB, GradCAM)
    default_num_classes: int


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(family: str, default_num_classes: int = 1000) -> Callable:
    """Decorator that registers ``fn(num_classes, **kwargs) -> nn.Module`` under its function name."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if fn.__name__ in _REGISTRY:
            raise RuntimeError(f"model {fn.__name__!r} is registered twice")
        _REGISTRY[fn.__name__] = ModelEntry(fn.__name__, fn, family, default_num_classes)
        return fn

    return wrap


def list_models(pattern: str = "*", family: str | None = None) -> list[str]:
    """Names of the registered models, sorted; ``pattern`` is a shell wildcard (``"bcos_resnet*"``)."""
    return sorted(
        name
        for name, entry in _REGISTRY.items()
        if fnmatch.fnmatch(name, pattern) and (family is None or entry.family == family)
    )


def model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; an unknown name raises a KeyError with close matches."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see e2kd_fast.models.list_models()"
        raise KeyError(f"unknown model {name!r}{hint}") from None


def create_model(name: str, num_classes: int | None = None, **kwargs) -> nn.Module:
    """Builds a registered model with freshly initialised weights (load weights with `load_checkpoint`).

    Args:
        name: a name from `list_models()`, e.g. ``"bcos_resnet18"`` or ``"resnet34"``.
        num_classes: number of outputs; defaults to 1000 (10 for the ``*_cifar`` models).
        **kwargs: passed to the model's constructor. B-cos CNNs accept ``norm`` (``"bnu"``,
            ``"pn"``, ``"ln"``, ``"gn<G>"``, ``"none"``), ``b`` and ``max_out``.

    Returns:
        The model, in train mode. B-cos models take the 6-channel input ``[x, 1 − x]``
        (`e2kd_fast.nn.AddInverse`), standard models a mean/std-normalised RGB image. The attribute
        ``model.e2kd_family`` says which.

    Example:
        >>> model = create_model("bcos_resnet18")
        >>> logits = model(AddInverse()(images))  # images in [0, 1], [N, 3, H, W]
    """
    entry = model_entry(name)
    model = entry.builder(num_classes=entry.default_num_classes if num_classes is None else num_classes, **kwargs)
    model.e2kd_name = name
    model.e2kd_family = entry.family
    return model
