"""What a resumed run may change: the run's saved config against the new one, key by key.

A resume continues a run exactly (the losses of an uninterrupted run) only when everything that shapes
its result is as it was: seed, data, batch, accumulation, models, objective, optimiser, schedule. A
few settings change only how the run is carried out, logged or saved, or (``train.epochs``) how long
it goes on; they are `HARMLESS`. Every other key, including any key added to the schema later, is
taken to change the result: a resume with such a change is refused unless it is forced.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Dotted keys (or whole sections) whose change keeps a resumed run what it was.
HARMLESS: tuple[str, ...] = (
    "train.epochs",  # extends (or shortens) the run; the schedule follows the new length from here on
    "train.out_dir",  # a copied or moved run folder
    "train.log_every_steps",
    "train.checkpoint_every_steps",
    "train.checkpoint_every_minutes",
    "train.keep_best",
    "train.eval_every_epochs",
    "train.device",
    "train.compile",  # the same step, compiled or eager
    "train.tf32",  # CUDA matmul / convolution precision: the same run to rounding, as a change of device
    "train.cudnn_benchmark",  # cuDNN's choice of algorithm: the same run to rounding
    "train.channels_last",  # memory layout only
    "train.activation_checkpointing",  # recomputes activations instead of keeping them: same gradients
    "data.num_workers",
    "data.eval_batch_size",  # evaluation only
    "engine",  # single / DDP / ZeRO: checkpoints move between strategies (docs/scaling.md)
)

_UNSET = "<unset>"


@dataclass(frozen=True)
class ConfigChange:
    """One dotted key whose value differs between the saved config and the new one."""

    key: str
    saved: Any
    new: Any

    @property
    def harmless(self) -> bool:
        return any(self.key == h or self.key.startswith(h + ".") for h in HARMLESS)

    def __str__(self) -> str:
        return f"{self.key}: {self.saved!r} → {self.new!r}"


def config_changes(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[ConfigChange]:
    """The keys whose values differ, in the new config's order (then keys only the saved one has).

    Args:
        saved, new: nested config mappings (`config_to_dict`); mapping values (``student.kwargs``)
            are compared key by key. A key missing on one side has the value ``"<unset>"``.
    """
    a, b = _flatten(saved), _flatten(new)
    keys = [*b, *(k for k in a if k not in b)]
    return [ConfigChange(k, a.get(k, _UNSET), b.get(k, _UNSET)) for k in keys if a.get(k, _UNSET) != b.get(k, _UNSET)]


def describe(changes: list[ConfigChange]) -> str:
    """``"train.seed: 0 → 3; data.batch_size: 8 → 4"``."""
    return "; ".join(str(c) for c in changes)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):  # an empty mapping adds no key: {} and an absent mapping agree
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


__all__ = ["HARMLESS", "ConfigChange", "config_changes", "describe"]
