"""Model registry: every model is reachable by name through `create_model`."""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ModelEntry:
    """A registered entrypoint and what callers need to know before building it."""

    name: str
    builder: Callable[..., nn.Module]
    family: str  # "bcos" (6-channel input, B-cos explanations) or "standard" (RGB, GradCAM)
    default_num_classes: int


_REGISTRY: dict[str, ModelEntry] = {}


class UnknownModelError(KeyError, ValueError):
    """A model name that is not registered: a KeyError to lookups, a ValueError to configuration checks."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class ModelArgumentError(ValueError):
    """A keyword argument that a registered model does not take.

    The message is ``"<key>.<argument> <reason>"``, or ``"'<argument>' <reason>"`` without a key.

    Attributes:
        model: the registered name; argument: the keyword; reason: what is wrong with it.
        key: the mapping the argument came from (``"student.kwargs"``), or None.
    """

    def __init__(self, model: str, argument: str, reason: str, key: str | None = None) -> None:
        super().__init__(f"{key}.{argument} {reason}" if key else f"{argument!r} {reason}")
        self.model, self.argument, self.reason, self.key = model, argument, reason, key

    def for_key(self, key: str) -> ModelArgumentError:
        """The same error, naming the argument as the setting ``key.<argument>``."""
        return ModelArgumentError(self.model, self.argument, self.reason, key)


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


def model_entry(name: str, key: str | None = None) -> ModelEntry:
    """The registry entry of ``name``.

    Args:
        name: a registered model name.
        key: the setting ``name`` came from (``"student.name"``), named in the error.

    Raises:
        UnknownModelError: ``name`` is not registered; the message gives close matches.
    """
    entry = _REGISTRY.get(name) if isinstance(name, str) else None
    if entry is None:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see e2kd_fast.models.list_models()"
        where = f"{key} {name!r}" if key else repr(name)
        raise UnknownModelError(f"{where} is not a registered model; {hint}")
    return entry


def model_arguments(name: str) -> tuple[str, ...] | None:
    """The keyword arguments that model ``name`` takes besides ``num_classes``, or None if they cannot be known.

    They are the builder's own keyword parameters, plus, when the builder forwards ``**kwargs`` to
    the model class its return annotation names, that class's parameters with defaults.
    """
    builder = model_entry(name).builder
    params = inspect.signature(builder).parameters.values()
    own = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        return tuple(a for a in own if a != "num_classes")
    try:
        target = typing.get_type_hints(builder).get("return")
    except Exception:  # an annotation that does not resolve: the arguments stay unknown
        return None
    if not inspect.isclass(target) or target is nn.Module:
        return None  # e.g. a torchvision model behind a plain nn.Module annotation
    forwarded = [
        p.name
        for p in inspect.signature(target.__init__).parameters.values()
        if p.default is not p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    return tuple(dict.fromkeys(a for a in [*own, *forwarded] if a not in ("self", "num_classes")))


def check_model_kwargs(name: str, kwargs: Mapping[str, Any], key: str | None = None) -> None:
    """Raises `ModelArgumentError` for the first of ``kwargs`` that model ``name`` does not take.

    ``key`` names the mapping the arguments came from (``"student.kwargs"``) in the message. Models
    whose arguments cannot be known (`model_arguments` is None) are checked when they are built.
    """
    accepted = model_arguments(name)
    if accepted is None:
        return
    for argument in kwargs:
        if argument == "num_classes":  # a setting of its own, next to the kwargs
            instead = f"{key.rsplit('.', 1)[0]}.num_classes" if key else "num_classes"
            raise ModelArgumentError(name, argument, f"is not a keyword argument here: set {instead}", key)
        if argument not in accepted:
            raise ModelArgumentError(name, argument, _not_taken(name, accepted), key)


def _not_taken(name: str, accepted: tuple[str, ...] | None) -> str:
    return f"is not an argument of {name}" + (f" (accepted: {', '.join(accepted)})" if accepted else "")


# How Python words a call with a keyword the callee does not take, or takes from the builder already.
_BAD_KEYWORD = re.compile(r"(unexpected keyword argument|multiple values for keyword argument) '(\w+)'")


def create_model(name: str, num_classes: int | None = None, **kwargs) -> nn.Module:
    """Builds a registered model with freshly initialised weights (load weights with `load_checkpoint`).

    Args:
        name: a name from `list_models()`, e.g. ``"bcos_resnet18"`` or ``"resnet34"``.
        num_classes: number of outputs; defaults to 1000 (10 for the ``*_cifar`` models).
        **kwargs: passed to the model's constructor. B-cos CNNs accept ``norm`` (``"bnu"``,
            ``"pn"``, ``"ln"``, ``"gn<G>"``, ``"none"``), ``b`` and ``max_out``.

    Raises:
        UnknownModelError: ``name`` is not registered.
        ModelArgumentError: a keyword argument the model does not take.

    Returns:
        The model, in train mode. B-cos models take the 6-channel input ``[x, 1 − x]``
        (`e2kd_fast.nn.AddInverse`), standard models a mean/std-normalised RGB image. The attribute
        ``model.e2kd_family`` says which; ``model.e2kd_name`` and ``model.e2kd_build`` (``num_classes``
        and the keyword arguments) say how to build it again.

    Example:
        >>> model = create_model("bcos_resnet18")
        >>> logits = model(AddInverse()(images))  # images in [0, 1], [N, 3, H, W]
    """
    entry = model_entry(name)
    check_model_kwargs(name, kwargs)
    try:
        model = entry.builder(num_classes=entry.default_num_classes if num_classes is None else num_classes, **kwargs)
    except TypeError as err:  # a keyword the model does not take, deeper than `model_arguments` sees
        match = _BAD_KEYWORD.search(str(err))
        if match is None or match.group(2) not in kwargs:
            raise
        argument = match.group(2)
        if match.group(1).startswith("multiple"):
            raise ModelArgumentError(name, argument, f"is set by {name} itself and cannot be given") from err
        raise ModelArgumentError(name, argument, _not_taken(name, model_arguments(name))) from err
    model.e2kd_name = name
    model.e2kd_family = entry.family
    # What rebuilds it: `save_checkpoint` stores it, so the file says which model it holds.
    model.e2kd_build = {"num_classes": entry.default_num_classes if num_classes is None else num_classes, **kwargs}
    return model
