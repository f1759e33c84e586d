"""Typed YAML: read a mapping, apply `key.sub=value` overrides, check it against dataclass annotations.

Generic: nothing here knows a run config. Errors are `UserError`s naming the file and the dotted key; the
modules that declare settings (`waveft.config`, the adapter methods, the sweep) import this one, never the
other way round.
"""
import dataclasses
import math
import os
import types
import typing
from typing import Any, Literal

import yaml

from waveft.errors import UserError

# A config file may name another one it extends (a path relative to the extending file): the extending
# file's mappings are merged key by key over the base's, any other value replaces the base's.
EXTENDS_KEY = "extends"


# Dataclass field metadata: a value derived from the settings (e.g. the resolved adapter), not a setting.
DERIVED = "derived"

YAML_BOOL_WORDS = {False: {"no", "off", "false", "n"}, True: {"yes", "on", "true", "y"}}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _refuse_non_finite(value: Any, key: str, source: str) -> None:
    """NaN or infinity (YAML's .nan / .inf, or "nan" read as a float) is never a setting: it would pass every
    range check (comparisons with NaN are false) and surface hours later as a NaN loss or score."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{source}: key '{key}' must be a finite number, got {value!r}")
    if isinstance(value, dict):
        for name, item in value.items():
            _refuse_non_finite(item, f"{key}.{name}" if key else name, source)
    if isinstance(value, list):
        for index, item in enumerate(value):
            _refuse_non_finite(item, f"{key}[{index}]", source)


def coerce_value(value: Any, tp, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp` (a dataclass: built from a mapping, unknown keys refused);
    ints are accepted for floats; NaN and infinity are refused everywhere. Raise naming the key."""
    _refuse_non_finite(value, key, source)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce_value(value, arg, key, source)
            except UserError:
                pass
        raise UserError(f"{source}: key '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads a bare no / off (yes / on) as a bool: the choice so spelled
            spelled = [c for c in typing.get_args(tp) if isinstance(c, str) and c.lower() in YAML_BOOL_WORDS[value]]
            value = spelled[0] if len(spelled) == 1 else value
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(c) for c in typing.get_args(tp))
            raise UserError(f"{source}: key '{key}' must be one of {choices}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{source}: key '{key}' must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [coerce_value(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, source)
    if tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{source}: key '{key}' must be a mapping, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
        try:
            number = float(value)
        except ValueError:
            pass
        else:
            _refuse_non_finite(number, key, source)
            return number
    if tp is bool and not isinstance(value, bool) or tp is int and isinstance(value, bool):
        raise UserError(f"{source}: key '{key}' must be {_type_name(tp)}, got {value!r}")
    if not isinstance(value, tp):
        raise UserError(f"{source}: key '{key}' must be {_type_name(tp)}, got {value!r}")
    return value


def _build(cls, values: Any, prefix: str, source: str):
    if not isinstance(values, dict):
        raise UserError(f"{source}: key '{prefix or '<root>'}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if not f.metadata.get(DERIVED)}
    for name in values:
        if name not in known:
            raise UserError(f"{source}: unknown key '{prefix + '.' if prefix else ''}{name}'")
    kwargs = {
        name: coerce_value(value, hints[name], f"{prefix}.{name}" if prefix else name, source)
        for name, value in values.items()
    }
    return cls(**kwargs)


def apply_override(tree: dict, override: str, schema=None) -> None:
    """Set `key.sub=value` (the value read as YAML; what is not YAML is a string) in `tree`, making the sections
    it names. With `schema` (the tree's dataclass), a field annotated `dict` takes the rest of the dotted name as
    one key: `overrides.model.pretrained=X` sets overrides["model.pretrained"] (a sweep's run-config overrides)."""
    dotted, sep, raw = override.partition("=")
    if not sep or not dotted.strip():
        raise UserError(f"override '{override}' must look like key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    parts = dotted.strip().split(".")
    node, section = tree, schema
    for index, part in enumerate(parts[:-1]):
        where = ".".join(parts[: index + 1])
        if section is not None:
            hint = typing.get_type_hints(section).get(part)
            if hint is dict:
                node.setdefault(part, {})[".".join(parts[index + 1:])] = value
                return
            if not dataclasses.is_dataclass(hint):
                raise UserError(f"override '{override}': '{where}' is not a section")
            section = hint
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override '{override}': '{where}' is not a section")
    node[parts[-1]] = value


def read_yaml_mapping(path: str, what: str = "config file") -> dict:
    """The mapping a YAML file holds (an empty file: {}), or a UserError naming the file."""
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    try:
        with open(path) as f:
            tree = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise UserError(f"{path}: the {what} must be a mapping")
    return tree


def merge_trees(base: dict, update: dict) -> dict:
    """`update` over `base`: mappings merged key by key, recursively; any other value (lists too) replaces."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_trees(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml_extending(path: str, what: str = "config file", _seen: tuple = ()) -> dict:
    """`read_yaml_mapping`, with the file its `extends:` key names merged underneath (recursively).

    The result no longer holds `extends`; a missing base or a cycle of files is a UserError naming both files.
    """
    tree = read_yaml_mapping(path, what)
    if EXTENDS_KEY not in tree:
        return tree
    base = tree.pop(EXTENDS_KEY)
    if not isinstance(base, str) or not base:
        raise UserError(f"{path}: key '{EXTENDS_KEY}' must be the path of a {what}, got {base!r}")
    base_path = os.path.normpath(os.path.join(os.path.dirname(path), base))
    seen = (*_seen, os.path.realpath(path))
    if os.path.realpath(base_path) in seen:
        raise UserError(f"{path}: key '{EXTENDS_KEY}' makes a cycle through {base_path}")
    if not os.path.isfile(base_path):
        raise UserError(f"{path}: key '{EXTENDS_KEY}' names a {what} that does not exist: {base_path}")
    return merge_trees(read_yaml_extending(base_path, what, seen), tree)
