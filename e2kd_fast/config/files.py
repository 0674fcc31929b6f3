"""YAML files of checked sections: reading with ``base:`` inheritance, deep merging, dotted overrides.

The file layer between `e2kd_fast.config.sections` (which knows nothing of files) and a schema such as
`e2kd_fast.config.schema`. Its rules:

* YAML is read with 1.2 floats (``3e-4`` is a number) by a safe loader; errors name the file and line.
* A file may start from others with a top-level ``base: other.yaml`` (or a list of files), paths relative
  to the file: the bases are loaded first, later ones over earlier ones, and the file is deep-merged
  over them (`deep_merge`: mappings merge key by key, anything else replaces).
* ``"dotted.key=value"`` overrides (`apply_section_overrides`) name a field of a section, or a key inside
  a mapping field; the value is read as YAML and fitted to the field's type.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from e2kd_fast.config.sections import Section, field_types, type_name, unknown_key_error

__all__ = [
    "apply_section_overrides",
    "deep_merge",
    "read_yaml_file",
    "read_yaml_with_bases",
]


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats and booleans, refusing duplicate keys.

    PyYAML (YAML 1.1) reads ``3e-4`` as a string and ``yes``/``no``/``on``/``off`` as booleans; here
    ``3e-4`` is a float, only ``true``/``false`` are booleans (so ``compile: yes`` is a string that the
    schema refuses by key), and a key given twice in one mapping is an error instead of the last one
    silently winning.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`, resolved by the constructor below
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (each key once per mapping)", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_FLOAT_TAG, _BOOL_TAG = "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_FLOAT_TAG, _BOOL_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _parse_yaml(text: str, source: str) -> Any:
    """The YAML document ``text``; a syntax error becomes a ValueError naming ``source``, line and column."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ValueError(f"{source}: invalid YAML{where}: {problem}") from None


def read_yaml_file(path: Path) -> dict[str, Any]:
    """The top-level mapping of one YAML file, as written (``base`` is not resolved; see `read_yaml_with_bases`).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: invalid YAML (with file, line and column) or a top level that is not a mapping.
    """
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    data = _parse_yaml(path.read_text(encoding="utf-8"), str(path))
    if data is None:
        return {}  # an empty file is an empty mapping
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merge key by key, anything else (lists included) replaces."""
    merged = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_yaml_with_bases(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping of ``path`` with its ``base`` files resolved (recursively; cycles are errors).

    ``chain`` holds the files whose bases are being resolved (recursion only, to report a cycle).

    Raises:
        FileNotFoundError: ``path`` or one of its base files does not exist.
        ValueError: invalid YAML, a malformed ``base`` entry or a cycle of bases.
    """
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(resolved) :], resolved))
        raise ValueError(f"config files name each other as base in a cycle: {cycle}")
    data = read_yaml_file(path)
    bases = data.pop("base", None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ValueError(f"{path}: 'base' must be a file name or a list of file names, got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:  # later bases override earlier ones, and the file overrides them all
        base_path = path.parent / base
        if not base_path.is_file():
            raise FileNotFoundError(f"base file {base!r} of {path} not found: {base_path}")
        merged = deep_merge(merged, read_yaml_with_bases(base_path, (*chain, resolved)))
    return deep_merge(merged, data)


def _accepts(tp: Any, kind: type) -> bool:
    """Whether the annotation ``tp`` is ``kind`` or ``kind | None`` (a Literal counts as str)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        return any(_accepts(a, kind) for a in typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return kind is str
    return tp is kind


def _parse_override_value(raw: str, tp: Any, override: str) -> Any:
    """Parses ``raw`` as a YAML scalar (or flow collection), then fits it to the field type ``tp``."""
    value = _parse_yaml(raw, f"override {override!r}")
    if tp is None:  # a free key inside a dict field (student.kwargs.norm): plain YAML
        return value
    if isinstance(value, str) and _accepts(tp, float) and not _accepts(tp, str):
        try:
            return float(value)  # belt and braces for number spellings the float resolver misses
        except ValueError:
            return value  # left for the section's own check to reject with the dotted key
    if isinstance(value, (bool, int, float)) and _accepts(tp, str) and not _accepts(tp, float):
        if isinstance(value, bool) and _accepts(tp, bool):
            return value  # ``bool | Literal["auto"]``: ``true`` is the switch
        return raw.strip()  # a string field given `2012` or `yes` means the text, not a number or bool
    return value


def apply_section_overrides(
    d: Mapping[str, Any], overrides: Sequence[str], sections: Mapping[str, type[Section]], config_name: str
) -> dict[str, Any]:
    """Applies ``"dotted.key=value"`` overrides to a mapping of ``sections``; returns a new mapping.

    The key must name a field of one of ``sections`` (``optim.lr``), or a key inside a mapping field
    (``student.kwargs.norm``); the value is parsed by `_parse_override_value`. Types are checked later,
    when the sections are built. ``config_name`` names the config in unknown-section errors
    (``"the config"``). The schema's `apply_overrides` documents the rules for its users.

    Returns:
        A deep copy of ``d`` with the overrides applied, in order.
    """
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'dotted.key=value' strings, not one string")
    out = copy.deepcopy(dict(d))
    for override in overrides:
        key, sep, raw = str(override).partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"malformed override {override!r}: expected 'dotted.key=value', e.g. 'optim.lr=3e-4'")
        section, *rest = key.split(".")
        if section not in sections:
            raise unknown_key_error(key if not rest else section, list(sections), config_name)
        allowed = [f.name for f in dataclasses.fields(sections[section])]
        if not rest:
            raise ValueError(f"override {override!r} names a section; name one of its keys: {', '.join(allowed)}")
        if rest[0] not in allowed:
            raise unknown_key_error(f"{section}.{rest[0]}", allowed, repr(section))
        tp = field_types(sections[section])[rest[0]]
        if len(rest) > 1 and not _accepts(tp, dict):
            raise ValueError(f"override {override!r}: {section}.{rest[0]} is a {type_name(tp)}, not a mapping")
        value = _parse_override_value(raw, tp if len(rest) == 1 else None, override)
        node = out
        for i, part in enumerate([section, *rest[:-1]]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                where = ".".join([section, *rest][: i + 1])
                raise ValueError(f"override {override!r}: {where} holds {node[part]!r}, not a mapping")
            node = node[part]
        node[rest[-1]] = value
    return out
