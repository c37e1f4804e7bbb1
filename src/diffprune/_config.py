"""Building the frozen config dataclasses (PruneConfig, TrainConfig, EvalConfig) from plain dicts (JSON/YAML).

Every key is checked against the dataclass's fields and type hints before construction, so a typo or a wrong
type gets a one-line error naming the key; the dataclass's own ``__post_init__`` then checks ranges.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from .errors import DiffPruneError, require


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return isinstance(value, (list, tuple)) and (not args or all(_type_ok(v, args[0]) for v in value))
    return isinstance(value, hint)


def _number(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise DiffPruneError(f"{where}={text!r} has the wrong type; expected a number, e.g. 1.0e-3") from None


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def config_from_dict(cls: type, values: dict | None, section: str | None = None):
    """Construct ``cls`` from ``values`` after checking names and types; errors are prefixed with ``section``."""
    section = section or cls.__name__
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    fields = sorted(f.name for f in dataclasses.fields(cls))
    for key, value in list(values.items()):
        require(key in hints, f"unknown key {section}.{key}; allowed: {fields}")
        if isinstance(value, str) and _type_ok(1.0, hints[key]) and not _type_ok(value, hints[key]):
            value = values[key] = _number(value, f"{section}.{key}")  # YAML 1.1 reads 1e-3 as a string
        require(_type_ok(value, hints[key]),
                f"{section}.{key}={value!r} has the wrong type; expected {_type_name(hints[key])}")
        if isinstance(value, list) and typing.get_origin(hints[key]) is not list:
            values[key] = tuple(value)  # YAML/JSON lists for tuple fields
    try:
        return cls(**values)
    except DiffPruneError as e:
        raise DiffPruneError(f"{section}: {e}") from None
    except TypeError as e:  # a required field is missing
        raise DiffPruneError(f"{section}: {e}; see the keys allowed in {section!r}") from None
