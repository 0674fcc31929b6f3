"""What a checkpoint knows about its model: architecture, outputs, classes and the input it expects.

Training checkpoints and exported students store a ``model_spec`` entry (plain values, so the file
stays loadable with ``weights_only=True``)::

    {"name": "bcos_resnet18", "num_classes": 4, "kwargs": {"norm": "bnu"}, "encoding": "bcos",
     "image_size": 48, "eval_resize": 56, "classes": ["cat", "dog", ...]}

`ModelSpec.from_checkpoint` reads it, and for checkpoints written before the entry existed derives
what it can from their stored run config; files with neither (plain state dicts) give None, and the
caller must be told the architecture.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from e2kd_fast.models._registry import create_model, model_entry
from e2kd_fast.models.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint

SPEC_KEY = "model_spec"


@dataclass(frozen=True)
class ModelSpec:
    """A model as a checkpoint describes it.

    Attributes:
        name: the registered model name (`e2kd_fast.models.list_models`).
        num_classes: its outputs.
        kwargs: further keyword arguments of `create_model` (``student.kwargs``).
        encoding: the input encoding, ``"bcos"`` ([x, 1 − x]) or ``"standard"`` (ImageNet mean/std).
        image_size: the evaluation crop the model was trained for; None if unknown.
        eval_resize: the evaluation resize before the crop; None if unknown.
        classes: the class names, index by index; None if unknown.
    """

    name: str
    num_classes: int
    kwargs: dict = field(default_factory=dict, hash=False)
    encoding: str = "bcos"
    image_size: int | None = None
    eval_resize: int | None = None
    classes: list[str] | None = field(default=None, hash=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain values to store under ``model_spec``."""
        return asdict(self)

    @classmethod
    def build(
        cls,
        name: str,
        num_classes: int | None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        image_size: int | None = None,
        eval_resize: int | None = None,
        classes: list[str] | None = None,
    ) -> ModelSpec:
        """The spec of registered model ``name``: its default outputs when ``num_classes`` is None and the
        encoding of its family."""
        entry = model_entry(name)
        return cls(
            name=name,
            num_classes=entry.default_num_classes if num_classes is None else int(num_classes),
            kwargs=dict(kwargs or {}),
            encoding=encoding_of(name),
            image_size=image_size,
            eval_resize=eval_resize,
            classes=None if classes is None else [str(c) for c in classes],
        )

    @classmethod
    def from_checkpoint(cls, payload: Any) -> ModelSpec | None:
        """The spec stored in a loaded checkpoint, else the one its run config implies, else None.

        Raises:
            ValueError: a stored spec that is not a mapping with at least ``name`` and ``num_classes``.
        """
        if not isinstance(payload, Mapping):
            return None
        stored = payload.get(SPEC_KEY)
        if stored is not None:
            if not isinstance(stored, Mapping) or "name" not in stored or "num_classes" not in stored:
                raise ValueError(f"the checkpoint's {SPEC_KEY} entry lacks 'name' or 'num_classes': {stored!r}")
            return cls.build(
                stored["name"],
                stored["num_classes"],
                stored.get("kwargs"),
                image_size=stored.get("image_size"),
                eval_resize=stored.get("eval_resize"),
                classes=stored.get("classes"),
            )
        config = payload.get("config")
        if isinstance(config, Mapping) and isinstance(config.get("student"), Mapping):
            student, data = config["student"], config.get("data") or {}
            if student.get("name"):
                return cls.build(
                    student["name"],
                    student.get("num_classes"),
                    student.get("kwargs"),
                    image_size=data.get("image_size"),
                    eval_resize=data.get("eval_resize"),
                )
        return None


def build_model(spec: ModelSpec) -> nn.Module:
    """A freshly initialised model as ``spec`` describes it (load its weights with `load_checkpoint`)."""
    return create_model(spec.name, num_classes=spec.num_classes, **dict(spec.kwargs))


def export_model(
    src: str | os.PathLike, dst: str | os.PathLike, spec: ModelSpec | None = None, *, use_ema: bool = True
) -> tuple[Path, ModelSpec]:
    """Writes the weights of checkpoint ``src`` to ``dst`` with its spec and nothing else (no optimiser
    state, no run config): a file for `load_checkpoint` and ``e2kd-fast explain`` / ``eval``.

    The weights are loaded into the model the spec describes first, so a file that does not fit it is
    refused rather than exported. Of a checkpoint that holds averaged weights (``train.ema_decay``)
    those are written, unless ``use_ema`` is False; the exported file holds one set of weights.

    Args:
        src: a training checkpoint, an exported model or (with ``spec``) any file `load_checkpoint` reads.
        dst: the file to write (atomically, mode as an ordinary new file).
        spec: the model; default: what ``src`` stores (`ModelSpec.from_checkpoint`).
        use_ema: export the averaged (EMA) weights when ``src`` holds them; False: the raw weights.

    Returns:
        (the path written, the spec stored in it).

    Raises:
        CheckpointError: ``src`` is unreadable, names no model and none was given, or does not fit it.
    """
    payload = read_checkpoint(src)
    spec = spec or ModelSpec.from_checkpoint(payload)
    if spec is None:
        raise CheckpointError(
            f"{src} does not say which model it holds (a plain state dict): give the architecture "
            "(e2kd-fast export --model NAME --num-classes N)"
        )
    model = build_model(spec)
    load_checkpoint(model, payload, use_ema=use_ema)
    return save_checkpoint(model, dst, **{SPEC_KEY: spec.to_dict()}), spec


def encoding_of(name: str) -> str:
    """``"bcos"`` for B-cos models, ``"standard"`` otherwise (as `e2kd_fast.data.bundle.input_encoding`)."""
    return "bcos" if model_entry(name).family == "bcos" else "standard"


__all__ = ["SPEC_KEY", "ModelSpec", "build_model", "encoding_of", "export_model"]
