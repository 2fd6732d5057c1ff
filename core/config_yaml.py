"""Config text in, plain data out: YAML files (with `base:` links) and `key=value` overrides, read with bounds.

What a config file or override may hold is bounded before anything is built from it: a file is at most
MAX_CONFIG_BYTES and an override MAX_OVERRIDE_CHARS, YAML aliases are refused (a few lines of `&a` / `*a` expand to
gigabytes when the config is saved with a checkpoint: the "billion laughs"), collections nest at most MAX_DEPTH
deep (deeper ones exhaust PyYAML's recursive composer), and at most MAX_BASES files are chained by `base:`. Every
failure is one ConfigError line with a bounded quote of the offending text. `core.config` types and checks the
result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from core.errors import UserError, quoted

MAX_CONFIG_BYTES = 1 << 20  # one config file; more is refused before it is parsed
MAX_OVERRIDE_CHARS = 10_000  # one `key=value` override
MAX_DEPTH = 32  # nesting of collections (reward args are the deepest part of a real config)
MAX_BASES = 16  # files chained by `base:`


class ConfigError(UserError):
    """A configuration file or override is invalid; the message names the key."""


def clip(text: str, limit: int = 60) -> str:
    """`text` cut to `limit` characters (marked with ...), for quoting user input in one-line errors."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def key_text(key: str) -> str:
    """A key typed by the user, for an error line: as it is when it is plain printable text, else its bounded repr."""
    return clip(key) if key and key.isprintable() and key == key.strip() else quoted(key)


class BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses aliases and collections nested deeper than MAX_DEPTH (module docstring)."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"YAML aliases (*{clip(str(event.anchor), 40)}) are not allowed in configs "
                              f"(line {event.start_mark.line + 1})")
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ConfigError(f"nested deeper than {MAX_DEPTH} levels (line {self.peek_event().start_mark.line + 1})")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def parse_yaml(text: str) -> Any:
    """One YAML document as plain data. Raises ConfigError (no location) for an alias or deep nesting, and
    yaml.YAMLError or ValueError (an integer of over 4300 digits) for text that is not YAML."""
    loader = BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def yaml_problem(err: Exception) -> str:
    """A parse error in one bounded line (PyYAML's own messages span several lines with a quoted snippet)."""
    problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
    if problem and mark is not None:
        return clip(" ".join(f"{problem} at line {mark.line + 1}, column {mark.column + 1}".split()), 160)
    return clip(" ".join(str(err).split()), 160)


def merge(base: dict, top: dict) -> dict:
    """`top` over `base`, mappings merged key by key."""
    out = dict(base)
    for key, value in top.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _where(path: Path) -> str:
    """A config path for an error line (a name with a newline or control character is quoted)."""
    text = str(path)
    return clip(text, 200) if text.isprintable() else quoted(text, 200)


def _read_text(path: Path) -> str:
    try:
        if not path.is_file():
            raise ConfigError(f"{_where(path)}: not a regular file" if path.exists() else
                              f"config file not found: {_where(path)}")
        with path.open("rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{_where(path)}: cannot read ({err.strerror or err})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{_where(path)}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{_where(path)}: not UTF-8 text (byte {err.start})") from None


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML config, following `base:` links (relative to the file)."""
    text = _read_text(path)
    where = _where(path)
    if path.resolve() in seen:
        raise ConfigError(f"config base cycle through {where}")
    if len(seen) >= MAX_BASES:
        raise ConfigError(f"{where}: more than {MAX_BASES} files chained by base:")
    try:
        values = parse_yaml(text)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    except (yaml.YAMLError, ValueError) as err:
        raise ConfigError(f"{where}: not valid YAML ({yaml_problem(err)})") from None
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: top level must be a mapping")
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{where}: base: expected a file name, got {quoted(base)}")
    return merge(read_yaml(path.parent / base, (*seen, path.resolve())), values)


def parse_override(text: str) -> dict:
    """`a.b=3` -> {"a": {"b": 3}}; the value is parsed as YAML (so `x=[1,2]` gives a list), or kept as text when it
    is not YAML."""
    if len(text) > MAX_OVERRIDE_CHARS:
        raise ConfigError(f"override {clip(text, 40)!r} is longer than {MAX_OVERRIDE_CHARS} characters")
    if "=" not in text:
        raise ConfigError(f"override {clip(text)!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = parse_yaml(raw) if raw != "" else ""
    except ConfigError as err:
        raise ConfigError(f"override {key_text(key)}: {err}") from None
    except (yaml.YAMLError, ValueError):
        value = raw
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


MOVED = {("system", "pairs_per_step"): "h2po", ("system", "grad_clip"): "h2po"}  # old place -> today's section
DROPPED = {("data", "min_year_field")}  # keys that nothing read, removed


def upgrade_recorded(values: dict) -> dict:
    """A config recorded by an older version (a checkpoint's header) in today's spelling: a MOVED key goes to its new
    section (where that section does not set it already), a DROPPED key is left out. Recorded configs only: in a
    file or override the old spelling is an error (`refuse_old_spellings`)."""
    out = {name: dict(value) if isinstance(value, dict) else value for name, value in values.items()}
    for (section, key), target in MOVED.items():
        if isinstance(out.get(section), dict) and key in out[section]:
            value = out[section].pop(key)
            if isinstance(out.setdefault(target, {}), dict):
                out[target].setdefault(key, value)
    for section, key in DROPPED:
        if isinstance(out.get(section), dict):
            out[section].pop(key, None)
    return out


def refuse_old_spellings(values: dict) -> dict:
    """Config text the user wrote: a key that moved is an error naming its new place.  -> values"""
    for (section, key), target in MOVED.items():
        if isinstance(values.get(section), dict) and key in values[section]:
            raise ConfigError(f"{section}.{key} is now {target}.{key} (an algorithm knob, no longer under "
                              f"{section}:); write it there")
    return values
