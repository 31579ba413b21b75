"""Typed records: the one codec between dataclasses and nested dicts, for configs and results alike.

Two kinds of data come in, checked key by key against the dataclass's fields and types:

    text    a config's YAML, layered files and `--section.key=value` flags: a value may be text to
            convert ("5" for an int, "0.9,0.95" for a tuple); an unknown key is refused with the
            nearest known one
    exact   JSON this codec wrote (`to_dict`): each value must already be of its field's type, and
            is kept as it is, so a record read and written again is the same bytes; keys a record
            does not know (a results.jsonl line's derived figures) are passed over

A versioned record (a study's results and summary) is JSON tagged with its kind and version
(`encode`, `decode`, `write_json`, `read_json`): one of another kind or version is refused as
`StaleRecord`, never misread. Below them: the YAML reader's limits.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import re
import types
import typing
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path

import yaml

from vitscale.common.errors import UserError
from vitscale.common.io import atomic_write_text


# ----------------------------------------------------------------------------- typed parsing
def shown(value, limit: int = 60) -> str:
    """A value as an error message shows it: short whatever its size (a list by its length)."""
    if isinstance(value, dict | list | tuple):
        return f"a {'mapping' if isinstance(value, dict) else 'list'} of {len(value)} values"
    text = repr(value[:limit] if isinstance(value, str) else value)
    return text if len(text) <= limit + 2 else text[:limit] + "..."


def _type_name(tp) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


# What a JSON value of each type may be (an int is a float's; JSON's true is no int's).
_JSON = {float: (int, float), int: int, str: str, bool: bool, dict: dict}


def _convert(value, tp, where: str, exact: bool = False):
    """`value` as `tp`, else a UserError naming `where`: text (an override's, or a YAML scalar or
    list) converted, or (`exact`) a JSON value checked and kept as it is.

    A list is taken apart only for a tuple field and never turned into text, so a huge or nested
    YAML value fails on its type at once. Text floats must be finite; JSON ones may be NaN (a
    standard error of no samples).
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            with contextlib.suppress(UserError):
                return _convert(value, option, where, exact)
        raise UserError(f"{where} must be {_type_name(tp)}, got {shown(value)}")
    if is_dataclass(tp):  # a record inside a tuple or an optional field
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a mapping of {tp.__name__}'s keys, got {shown(value)}")
        return from_dict(tp, value, f"{where}.", exact)
    if origin is tuple:
        if exact and not isinstance(value, list):
            raise UserError(f"{where} must be a list, got {shown(value)}")
        sep = r"[,x]" if set(args) - {Ellipsis} == {int} else ","  # "0.9,0.95", "224x160"
        items = [p for p in re.split(sep, value) if p] if isinstance(value, str) else value
        items = items if isinstance(items, list | tuple) else [items]
        types_ = [args[0]] * len(items) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(types_):
            raise UserError(f"{where} needs {len(types_)} comma-separated values, got {shown(value)}")
        return tuple(_convert(v, t, where, exact) for v, t in zip(items, types_, strict=True))
    if tp is dict and isinstance(value, dict):  # a free-form mapping a record keeps (a measurement)
        return value
    if exact:
        if tp not in _JSON:
            raise TypeError(f"{where}: a record holds no {_type_name(tp)}")
        if not isinstance(value, _JSON[tp]) or (type(value) is bool) != (tp is bool):
            raise UserError(f"{where} must be {_type_name(tp)}, got {shown(value)}")
        return value
    if isinstance(value, dict | list | tuple | None) or (isinstance(value, bool) and tp is not bool):
        raise UserError(f"{where} must be {_type_name(tp)}, got {shown(value)}")
    text = str(value)  # a scalar: as long as the file or flag it came from, at most
    if tp is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise UserError(f"{where} must be true or false, got {shown(value)}")
    try:
        out = value if isinstance(value, tp) else tp(text)
    except (TypeError, ValueError):
        raise UserError(f"{where} must be {_type_name(tp)}, got {shown(value)}") from None
    if tp is float and not math.isfinite(out):
        raise UserError(f"{where} must be a finite number, got {shown(value)}")
    return out


def typed(cls, data: dict | None, where: str = "", exact: bool = False) -> dict:
    """`data` (a nested dict) with every key checked against dataclass `cls` and every value
    converted (`exact`: checked) to its field's type; sections stay dicts and nothing is built, so
    no field's check runs yet (a layer of a config: a file's keys, before the flags that complete it)."""
    if not isinstance(data, dict | None):
        raise UserError(f"{where[:-1] or cls.__name__} must be a mapping of keys, got {shown(data)}")
    hints, known = typing.get_type_hints(cls), {f.name for f in fields(cls)}
    out = {}
    for key, value in (data or {}).items():
        name = f"{where}{key}"
        if key not in known:
            if exact:  # a figure derived from the record, written beside its fields
                continue
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {where}{close[0]}?" if close else f"known: {', '.join(sorted(known))}"
            raise UserError(f"unknown config key {shown(name)}; {hint}")
        if is_dataclass(hints[key]):
            if not isinstance(value, dict | None):
                raise UserError(f"{name!r} is a section, not a value: set its keys ({name}.KEY), got "
                                f"{shown(value)}")
            out[key] = typed(hints[key], value, f"{name}.", exact)
        else:
            out[key] = _convert(value, hints[key], name, exact)
    return out


def _build(cls, values: dict, where: str = ""):
    """Dataclass `cls` from `typed` values, each section built (and checked) before its parent; a
    field with no default must be there."""
    hints = typing.get_type_hints(cls)
    lacking = [f.name for f in fields(cls) if f.init and f.name not in values
               and f.default is MISSING and f.default_factory is MISSING]
    if lacking:
        raise UserError(f"{where}{lacking[0]} is missing")
    kwargs = {k: _build(hints[k], v, f"{where}{k}.") if is_dataclass(hints[k]) else v
              for k, v in values.items()}
    try:
        return cls(**kwargs)
    except UserError as e:  # a section's own check: say which section
        if where and not str(e).startswith(where):
            raise UserError(f"{where[:-1]}: {e}") from None
        raise


def from_dict(cls, data: dict, where: str = "", exact: bool = False):
    """Build dataclass `cls` from a nested dict, checking every key and type (an empty section
    takes its defaults); `exact`: JSON that `to_dict` wrote (see the module docstring)."""
    return _build(cls, typed(cls, data, where, exact), where)


def merge(base: dict, top: dict) -> dict:
    """`top` laid over `base`: a section both hold is merged key by key, any other key replaced."""
    out = dict(base)
    for key, value in top.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge(out[key], value) if both else value
    return out


def to_dict(record) -> dict:
    """A dataclass as nested plain data, for YAML and JSON: sections and records as dicts, tuples
    as lists."""
    return {f.name: _plain(getattr(record, f.name)) for f in fields(record)}


def _plain(value):
    if is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def set_item(data: dict, item: str) -> dict:
    """Set one `section.key=value` string (leading dashes optional) in nested dict `data`."""
    key, sep, text = item.lstrip("-").partition("=")
    if not sep:
        raise UserError(f"override {shown(item)} must look like --section.key=value")
    *sections, name = key.split(".")
    node = data
    for depth, section in enumerate(sections, 1):
        node = node.setdefault(section, {})  # an unknown section is named by from_dict
        if not isinstance(node, dict):
            raise UserError(f"{'.'.join(sections[:depth])!r} has no sub-keys")
    node[name] = text
    return data


def apply_overrides(cfg, overrides: list[str]):
    """Apply `section.key=value` strings (leading dashes optional) to a config.

    The config is checked once, after all are applied: a field may depend on one set later
    (`--data.name=image-folder --data.path=DIR` in either order).
    """
    data = to_dict(cfg)
    for item in overrides:
        set_item(data, item)
    return from_dict(type(cfg), data)


# ----------------------------------------------------------------------------- versioned records
class StaleRecord(UserError):
    """A record of another kind or version (or not a record at all): refused, never misread."""


def encode(record, version: int) -> dict:
    """A record as plain JSON-able data, tagged with its kind and version."""
    return {"kind": type(record).__name__, "version": version} | to_dict(record)


def decode(cls, data, version: int, where: str = "record"):
    """The record of class `cls` that `encode(record, version)` gave; StaleRecord (naming `where`)
    if `data` is of another kind or version, or does not fit `cls`."""
    if not isinstance(data, dict) or data.get("kind") != cls.__name__:
        raise StaleRecord(f"{where} is not a {cls.__name__} record")
    if data.get("version") != version:  # the first records carried no version
        raise StaleRecord(f"{where} was written by {cls.__name__} version {data.get('version', 1)}, "
                          f"this vitscale reads version {version}")
    try:
        return from_dict(cls, {k: v for k, v in data.items() if k not in ("kind", "version")}, exact=True)
    except (UserError, TypeError, ValueError) as e:  # ValueError: a record's own check
        raise StaleRecord(f"{where} does not match {cls.__name__}: {e}") from None


def write_json(path: Path, record, version: int) -> None:
    """A versioned record as an indented JSON file, written atomically."""
    atomic_write_text(path, json.dumps(encode(record, version), indent=2))


def read_json(path: Path, cls, version: int):
    """The record of class `cls` in JSON file `path`; StaleRecord on another kind or version, or a
    file that cannot be read."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:  # missing, cut (JSONDecodeError) or not text (UnicodeDecodeError)
        raise StaleRecord(f"{path} cannot be read as JSON: {e}") from None
    return decode(cls, data, version, str(path))


# ----------------------------------------------------------------------------- YAML files
MAX_BYTES = 1 << 20  # a config is a few KB


MAX_DEPTH = 32  # a config nests three levels


MAX_VALUES = 10_000  # values after expanding aliases (a study's longest list is ~100)


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses, while composing, YAML nested too deeply or whose aliases expand
    past MAX_VALUES values (a 'billion laughs' is a few hundred bytes), before building anything."""

    def compose_document(self):
        self._depth, self._values = 0, {}  # node id -> values it expands to
        return super().compose_document()

    def compose_node(self, parent, index):
        alias = self.check_event(yaml.AliasEvent)
        mark = self.peek_event().start_mark
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", mark)
        node = super().compose_node(parent, index)
        self._depth -= 1
        if alias and id(node) not in self._values:
            raise yaml.composer.ComposerError(None, None, "an alias refers to a value that contains it", mark)
        if not alias:
            children = node.value if isinstance(node, yaml.SequenceNode) else [
                n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
            self._values[id(node)] = 1 + sum(self._values[id(c)] for c in children)
        if self._values[id(node)] > MAX_VALUES:
            raise yaml.composer.ComposerError(None, None, f"aliases expand to over {MAX_VALUES} values", mark)
        return node

    def construct_yaml_int(self, node):
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # Python refuses to parse an integer of thousands of digits
            raise yaml.constructor.ConstructorError(None, None, "an integer too long to read",
                                                    node.start_mark) from None


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def _read_yaml(p: Path):
    """The YAML data in file `p`, or a UserError naming it."""
    try:
        if not p.exists():
            raise UserError(f"config file {str(p)!r} does not exist")
        if not p.is_file():
            raise UserError(f"config file {str(p)!r} is not a file")
        if p.stat().st_size > MAX_BYTES:
            raise UserError(f"config file {str(p)!r} is {p.stat().st_size / 2**20:.1f} MB; a config is a "
                            "few KB: is it the right file?")
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"config file {str(p)!r} is not a text YAML file (not UTF-8 text)") from None
    except OSError as e:
        raise UserError(f"cannot read config file {str(p)!r}: {e.strerror}") from None
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"config file {str(p)!r} is not valid YAML{where}: {problem[:100]}") from None


def read_mapping(p: Path) -> dict:
    """The mapping of keys config file `p` holds ({} for an empty file), else a UserError."""
    data = _read_yaml(p)
    if data is not None and not isinstance(data, dict):
        raise UserError(f"config file {str(p)!r} must hold a mapping of keys (e.g. `train: {{epochs: 5}}`), "
                        f"got {shown(data)}")
    return data or {}


def dump_yaml(cfg, leave_out: tuple[str, ...] = ()) -> str:
    """A config as YAML, without the top-level fields `leave_out` (a run's or study's `out`:
    a directory is where it is, not where its config says)."""
    return yaml.safe_dump({k: v for k, v in to_dict(cfg).items() if k not in leave_out}, sort_keys=False)
