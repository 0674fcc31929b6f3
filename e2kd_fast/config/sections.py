"""Checked sections: frozen dataclasses whose fields are type checked and validated on construction.

The library layer under the project's schema (`e2kd_fast.config.schema`) and the XDistillation config
(`e2kd_fast.xdistill.config`). A section is a ``@dataclass(frozen=True)`` subclass of `Section` with
plain-data fields (``bool``, ``int``, ``float``, ``str``, ``Literal[...]``, ``dict``, ``list[X]``,
``X | None`` and unions such as ``bool | Literal["auto"]``); it names its key in the config with
``_section`` and checks its values in ``_validate``::

    @dataclass(frozen=True)
    class OptimConfig(Section):
        _section = "optim"
        lr: float = 1e-3

        def _validate(self) -> None:
            self._positive("lr")

Every error is a ``ValueError`` that names the dotted key (``optim.lr``) and what is allowed;
`sections_from_dict` builds a set of sections from a nested mapping and rejects unknown keys with a
"did you mean" suggestion. Nothing here knows a particular schema or reads files.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal, Union

__all__ = [
    "Section",
    "field_types",
    "require",
    "sections_from_dict",
    "type_name",
    "unknown_key_error",
]


def type_name(tp: Any) -> str:
    """How an annotation reads in an error message: ``float``, ``int or None``, ``one of 'a', 'b'``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        values = typing.get_args(tp)
        return repr(values[0]) if len(values) == 1 else "one of " + ", ".join(repr(a) for a in values)
    if origin in (Union, types.UnionType):
        return " or ".join("None" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if tp is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _check_plain_data(key: str, value: Any) -> None:
    """Raises unless ``value`` is YAML-serialisable plain data (so that save → load gives it back)."""
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{key}: must be a finite number, got {value!r}")
        return
    if isinstance(value, list):  # not tuples: YAML has no tuple, so one would come back as a list
        for i, item in enumerate(value):
            _check_plain_data(f"{key}[{i}]", item)
        return
    if isinstance(value, Mapping):
        for k, item in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{key}: keys must be strings, got {k!r}")
            _check_plain_data(f"{key}.{k}", item)
        return
    raise ValueError(f"{key}: expected plain data (str, int, float, bool, None, list, mapping), got {value!r}")


def _check_type(key: str, value: Any, tp: Any, expected: str | None = None) -> Any:
    """Returns ``value`` converted to the annotation ``tp`` (int → float, mapping copied), or raises ValueError.

    ``expected`` is how the type reads in a mismatch message (for the arm of ``X | None``: ``float or None``).
    """
    expected = expected or type_name(tp)
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if value is None:
            raise ValueError(f"{key}: expected {expected}, got None")
        if len(arms) == 1:
            return _check_type(key, value, arms[0], expected)
        for arm in arms:  # ``bool | Literal["auto"]``: the first arm that takes the value
            try:
                return _check_type(key, value, arm, expected)
            except ValueError:
                continue
        raise ValueError(f"{key}: expected {expected}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(f"{key}: must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")
        return value
    # bool is an int subclass: `true` is not an epoch count, and `1` is not a switch.
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        dict: isinstance(value, Mapping),
    }[tp]
    if not ok:
        raise ValueError(f"{key}: expected {expected}, got {type(value).__name__} {value!r}")
    if tp is float:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{key}: must be a finite number, got {value!r}")
    if tp is dict:
        _check_plain_data(key, value)
        value = copy.deepcopy(dict(value))  # the config owns its copy; the caller's dict can change freely
    return value


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of a section (section modules use postponed, string annotations).

    Cached: annotations are resolved once per class, not on every construction.
    """
    return typing.get_type_hints(cls)


def require(ok: bool, key: str, message: str, value: Any) -> None:
    """Raises ``ValueError("<key>: <message>; got <value>")`` unless ``ok``: the one form of a range check."""
    if not ok:
        raise ValueError(f"{key}: {message}; got {value!r}")


class Section:
    """Mixin of the section dataclasses: type checks every field, then runs the section's `_validate`.

    Subclasses set ``_section`` and override ``_validate``, using ``_key`` and ``_positive``. These hooks
    keep their leading underscore on purpose: a section's public attributes are exactly its fields (the
    keys of the config), so no helper name can collide with a key.
    """

    _section: ClassVar[str] = ""  # the key of the section in the config and in YAML, used in error messages

    def __post_init__(self) -> None:
        hints = field_types(type(self))
        for f in dataclasses.fields(self):
            key, value, tp = f"{self._section}.{f.name}", getattr(self, f.name), hints[f.name]
            if typing.get_origin(tp) is list:  # ``list[X]``: checked element by element
                if not isinstance(value, list | tuple):
                    raise ValueError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
                (arm,) = typing.get_args(tp)
                value = [_check_type(f"{key}[{i}]", v, arm) for i, v in enumerate(value)]
            else:
                value = _check_type(key, value, tp)
            object.__setattr__(self, f.name, value)  # frozen: normalise (int → float) in place once
        self._validate()

    def _key(self, name: str) -> str:
        """The dotted key of field ``name`` (``optim.lr``), as errors name it."""
        return f"{self._section}.{name}"

    def _positive(self, *names: str, allow_zero: bool = False, optional: bool = False) -> None:
        """Requires each named field to be > 0 (>= 0 with ``allow_zero``; None passes with ``optional``)."""
        for name in names:
            value = getattr(self, name)
            if optional and value is None:
                continue
            ok = value >= 0 if allow_zero else value > 0
            require(ok, self._key(name), "must be >= 0" if allow_zero else "must be > 0", value)

    def _validate(self) -> None:  # pragma: no cover - every section overrides it
        pass


def unknown_key_error(key: str, allowed: Sequence[str], where: str) -> ValueError:
    """The error for an unknown dotted ``key``: the allowed keys of ``where``, and the closest one if any.

    Returned, not raised, so that callers ``raise`` it themselves and the traceback points at them.
    """
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown key {key!r}; allowed keys of {where}: {', '.join(allowed)}{hint}")


def sections_from_dict(d: Any, sections: Mapping[str, type[Section]], where: str) -> dict[str, Section]:
    """Each section of ``sections`` built from its mapping in ``d`` (absent or None: its defaults).

    Strict: an unknown section or key is an error (with a suggestion), as is a missing required key;
    the values are then checked by the section classes themselves. Shared by `config_from_dict` and
    the XDistillation config; ``where`` names the config in errors (``"the config"``).
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"{where} must be a mapping of sections ({', '.join(sections)}), got {type(d).__name__}")
    for key in d:
        if key not in sections:
            raise unknown_key_error(str(key), list(sections), where)
    built: dict[str, Section] = {}
    for name, cls in sections.items():
        values = d.get(name)
        if values is None:
            values = {}
        if not isinstance(values, Mapping):
            raise ValueError(f"{name}: expected a mapping of its keys, got {type(values).__name__} {values!r}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in allowed:
                raise unknown_key_error(f"{name}.{key}", allowed, repr(name))
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in values and _is_required(f)]
        if missing:
            raise ValueError(f"missing required key '{name}.{missing[0]}'")
        built[name] = cls(**values)
    return built


def _is_required(f: dataclasses.Field) -> bool:
    """Whether a field has no default, so the mapping must give it."""
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
