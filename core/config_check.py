"""Typing and range checks of single config values (core/config.py builds the dataclasses with them).

A value is converted to its field's annotation (an int or numeric text to a float, nothing else), then checked
against the range declared in the field's metadata: `low` <= x or `above` < x, x <= `high` or x < `below`, and a
list's `length`; floats are finite always. Text is bounded and free of NUL characters; free-form mappings (reward
args) hold plain data only, as a checkpoint saves them. Every refusal is one ConfigError line naming the dotted key,
a bounded quote of the value and the range.
"""

from __future__ import annotations

import math
import re
import types
import typing
from dataclasses import field
from typing import Any, Literal

from core.config_yaml import MAX_DEPTH, ConfigError, key_text
from core.errors import quoted

MAX_TEXT = 4096  # a string value (paths, host names)


def _number(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def range_text(meta: typing.Mapping[str, Any]) -> str:
    """A field's range in interval notation, e.g. `[0, 1)`."""
    left = f"[{_number(meta['low'])}" if "low" in meta else f"({_number(meta['above'])}" if "above" in meta \
        else "(-inf"
    right = f"{_number(meta['high'])}]" if "high" in meta else f"{_number(meta['below'])})" if "below" in meta \
        else "inf)"
    return f"{left}, {right}"


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _check_text(value: str, key: str) -> str:
    if len(value) > MAX_TEXT:
        raise ConfigError(f"{key}: text of {len(value)} characters; at most {MAX_TEXT}")
    if "\0" in value:
        raise ConfigError(f"{key}: text with a NUL character ({quoted(value)})")
    return value


def _check_plain(value: Any, key: str, depth: int = 0) -> Any:
    """`value` if it is plain data (what JSON holds: text, finite numbers, bools, null, lists, mappings with text
    keys), as a checkpoint saves it; a date, a set or bytes from YAML tags, a NaN or deep nesting raise."""
    if depth > MAX_DEPTH:
        raise ConfigError(f"{key}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        for name, item in value.items():
            if not isinstance(name, str):
                raise ConfigError(f"{key}: key {quoted(name)} is not a string")
            _check_plain(item, f"{key}.{key_text(name)}", depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_plain(item, f"{key}[{i}]", depth + 1)
    elif isinstance(value, str):
        _check_text(value, key)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} = {quoted(value)} is not a finite number")
    elif not (value is None or isinstance(value, (bool, int, float))):
        raise ConfigError(f"{key}: expected plain data (text, numbers, lists, mappings), got {quoted(value)}")
    return value


def _to_float(value: Any, key: str) -> Any:
    """An int or numeric text (PyYAML reads `3e-4`, without a dot, as text) for a float field, as a float."""
    if isinstance(value, str) and not _FLOAT_TEXT.fullmatch(value.strip()):
        return value
    try:
        return float(value)
    except OverflowError:  # an int beyond float's range
        raise ConfigError(f"{key} = {quoted(value)} is too large for a number") from None


def check_value(value: Any, annotation: Any, key: str) -> Any:
    """Return `value` converted to `annotation`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        if value not in typing.get_args(annotation):
            raise ConfigError(f"{key}: {quoted(value)} is not one of {list(typing.get_args(annotation))}")
        return value
    if origin in (types.UnionType, typing.Union):
        for arg in typing.get_args(annotation):
            if arg is type(None) and value is None:
                return None
            try:
                return check_value(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {quoted(value)} does not fit {annotation}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {quoted(value)}")
        (item,) = typing.get_args(annotation)
        return [check_value(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {quoted(value)}")
        return _check_plain(value, key)
    if annotation is float and (isinstance(value, (int, str)) and not isinstance(value, bool)):
        value = _to_float(value, key)
    if annotation in (int, float, str, bool) and (type(value) is not annotation):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {quoted(value)}")
    return _check_text(value, key) if annotation is str else value


def _in_range(x: float, meta: typing.Mapping[str, Any]) -> bool:
    if isinstance(x, float) and not math.isfinite(x):
        return False
    return (x >= meta.get("low", x) and (x > meta["above"] if "above" in meta else True)
            and x <= meta.get("high", x) and (x < meta["below"] if "below" in meta else True))


def check_limits(value: Any, meta: typing.Mapping[str, Any], key: str) -> Any:
    """`value` (already typed) if it is inside its field's declared range and length, else ConfigError."""
    if "length" in meta:
        fewest, most = meta["length"]
        if not fewest <= len(value) <= most:
            raise ConfigError(f"{key} has {len(value)} entries; allowed {fewest} to {most}")
    for i, x in enumerate(value if isinstance(value, list) else [value]):
        if isinstance(x, (int, float)) and not isinstance(x, bool) and not _in_range(x, meta):
            where = f"{key}[{i}]" if isinstance(value, list) else key
            raise ConfigError(f"{where} = {quoted(x)} is outside its range {range_text(meta)}")
    return value


def range_help(meta: typing.Mapping[str, Any]) -> str:
    """What `h2po config` adds to a field's help: its range (of each entry of a list) and a list's length."""
    bounded = any(name in meta for name in ("low", "above", "high", "below"))
    parts = [f"Range {range_text(meta)}" + (" each" if "length" in meta else "")] if bounded else []
    if "length" in meta:
        parts.append(f"{meta['length'][0]} to {meta['length'][1]} entries")
    return f" {', '.join(parts)}." if parts else ""


def option(default: Any, help: str, *, low: float | None = None, above: float | None = None,
           high: float | None = None, below: float | None = None, length: tuple[int, int] | None = None) -> Any:
    """A dataclass field with a default, a one-line help text and, for a number (or each number of a list), its
    range: low <= x (or above < x) and x <= high (or x < below); `length` = (fewest, most) entries of a list.
    Floats are finite whatever the range; `check_limits` enforces it all when a config is read."""
    limits = {"low": low, "above": above, "high": high, "below": below, "length": length}
    metadata = {"help": help, **{name: value for name, value in limits.items() if value is not None}}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)
