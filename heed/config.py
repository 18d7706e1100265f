"""Stage configs: one dataclass per stage, the CLI generated from it.

Every field is declared with `option(default, "one-line help")`. The same
dataclass gives `heed STAGE --help`, the command-line flags, and the keys a
YAML file may set (`--config FILE.yaml`). Precedence: defaults < YAML < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import MISSING, field
from pathlib import Path
from typing import Any

import yaml

from heed.utils import HeedError


def option(default: Any = MISSING, help: str = "", *, choices: tuple | None = None):
    """A config field with its one-line help. Lists and dicts are copied per instance."""
    metadata = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata)
    return field(default=default, metadata=metadata)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(underlying type, is_optional) for `X`, `X | None`, `Optional[X]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


class _BadValue(Exception):
    """What is wrong with one field's value (build says where)."""


def _parse_value(name: str, tp: Any, raw: Any) -> Any:
    """Convert a CLI string or YAML value to the field's type, with a clear error."""
    base, optional = _base_type(tp)
    if raw is None or (optional and isinstance(raw, str) and raw.lower() in ("none", "null", "")):
        if optional:
            return None
        raise _BadValue("may not be empty")
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base) or (str,)
        if isinstance(raw, str):
            raw = [p.strip() for p in raw.split(",") if p.strip()]
        if not isinstance(raw, list):
            raise _BadValue(f"expected a list of {item.__name__}, got {_show(raw)}")
        return [_scalar(item, x) for x in raw]
    return _scalar(base, raw)


def _scalar(base: type, raw: Any) -> Any:
    """One value of type bool, int, float or str, from a CLI string or a YAML scalar. Nothing is
    bent to fit: 3.5 is not the int 3, true is not the number 1, a list is not a string."""
    kind = getattr(base, "__name__", str(base))
    if base is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, (str, int)) and str(raw).lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(raw, (str, int)) and str(raw).lower() in ("0", "false", "no", "off"):
            return False
    elif base is str:
        if isinstance(raw, str):
            return raw
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return str(raw)  # `out: 2024` in YAML
    elif base in (int, float) and not isinstance(raw, bool):
        if isinstance(raw, str):
            try:
                raw = base(raw.strip())
            except ValueError:
                raise _BadValue(f"expected {kind}, got {_show(raw)}") from None
        if base is int and isinstance(raw, int):
            return raw
        if isinstance(raw, (int, float)):
            try:
                number = float(raw)
            except OverflowError:
                raise _BadValue(f"{_show(raw)} is too large") from None
            if not math.isfinite(number):
                raise _BadValue(f"expected a finite number, got {_show(raw)}")
            if base is float:
                return number
            if number.is_integer():
                return int(number)
    elif base not in (int, float, bool, str):
        try:
            return base(raw)
        except (TypeError, ValueError):
            pass
    raise _BadValue(f"expected {kind}, got {_show(raw)}")


def _show(value: Any) -> str:
    from heed.data import show

    return show(value)


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per dataclass field (`--field-name`), defaults shown in the help."""
    hints = typing.get_type_hints(cls)
    parser.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS,
                        help="YAML file setting any of the fields below (flags win)")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        base, _ = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        if f.default is not MISSING:
            help_text += f" (default: {f.default})"
        elif f.default_factory is not MISSING:
            default = f.default_factory()
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            help_text += f" (default: {shown})"
        else:
            help_text += " (required)"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            metavar = f.name.upper() if typing.get_origin(base) is not list else "A,B,..."
            parser.add_argument(flag, metavar=metavar, **kwargs)


_CONSTRUCT_ERRORS = (ValueError, TypeError, AttributeError, IndexError, KeyError, OverflowError)


def _construct(node: Any) -> Any:
    """The Python value of a composed YAML node (None for an empty document), as safe_load gives."""
    return None if node is None else yaml.SafeLoader("").construct_document(node)


def _constructs(node: Any) -> bool:
    try:
        _construct(node)
        return True
    except (yaml.YAMLError, RecursionError, *_CONSTRUCT_ERRORS):
        return False


class YamlValues(dict):
    """A config file's top-level mapping, remembering its file and each key's line."""

    def __init__(self, data: dict, source: str, lines: dict):
        super().__init__(data)
        self.source, self.lines = source, lines


def load_yaml(path: str | Path) -> YamlValues:
    """A YAML config file's mapping of field: value; HeedError (file and line) for anything else."""
    path = Path(path)
    if not path.is_file():
        raise HeedError(f"{path}: config file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data.count(b"\n", 0, start) + 1
        raise HeedError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[start]:02x})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        value = _construct(node)
    except yaml.YAMLError as e:
        raise HeedError(f"{path}: not valid YAML: {e}") from None
    except RecursionError:
        raise HeedError(f"{path}: not valid YAML: nested too deep") from None
    except _CONSTRUCT_ERRORS as e:
        # PyYAML's constructors raise these for scalars that look like what they are not
        # (a date 2020-13-45, `!!float abc`); say which value did
        line = next((v.start_mark.line + 1 for _, v in getattr(node, "value", ()) if not _constructs(v)), None)
        where = f"{path}:{line}" if line else f"{path}"
        raise HeedError(f"{where}: not valid YAML: {type(e).__name__}: {e}") from None
    if value is None:
        return YamlValues({}, str(path), {})
    if not isinstance(value, dict) or not isinstance(node, yaml.MappingNode):
        raise HeedError(f"{path}: expected a mapping of field: value at the top level")
    lines: dict = {}
    for key_node, _ in node.value:
        line = key_node.start_mark.line + 1
        try:
            key = yaml.SafeLoader("").construct_object(key_node, deep=True)
        except (yaml.YAMLError, RecursionError):  # a merge key (<<) and the like: no line to give
            continue
        if not isinstance(key, str):
            raise HeedError(f"{path}:{line}: field names must be strings, got {_show(key)}")
        if key in lines:
            raise HeedError(f"{path}:{line}: field '{key}' set twice (also on line {lines[key]})")
        lines[key] = line
    for key in value:  # keys that came from a merge (<<: *anchor): the file's, without a line
        if not isinstance(key, str):
            raise HeedError(f"{path}: field names must be strings, got {_show(key)}")
        lines.setdefault(key, None)
    return YamlValues(value, str(path), lines)


def build(cls: type, values: dict, source: str | None = None) -> Any:
    """Instantiate `cls` from a dict of raw values, checking names, types, choices and required
    fields. Values from `load_yaml` are reported with their file and line."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    lines = getattr(values, "lines", {})  # the keys from a file, and their lines
    source = source or getattr(values, "source", None) or "config"
    kwargs, given_as = {}, {}
    for key, raw in values.items():
        where = f"{source}:{lines[key]}" if lines.get(key) else source
        if not isinstance(key, str):
            raise HeedError(f"{where}: field names must be strings, got {_show(key)}")
        name = key.replace("-", "_")
        if name not in known:
            raise HeedError(f"{where}: unknown field '{key}' (known: {', '.join(sorted(known))})")
        if name in given_as:
            raise HeedError(f"{where}: field '{key}' set twice (also as '{given_as[name]}')")
        given_as[name] = key
        try:
            value = _parse_value(name, hints[name], raw)
            choices = known[name].metadata.get("choices")
            if choices and value is not None and value not in choices:
                raise _BadValue(f"expected one of {', '.join(map(str, choices))}, got {_show(raw)}")
        except _BadValue as e:
            if key in lines:
                raise HeedError(f"{where}: field '{key}': {e}") from None
            raise HeedError(f"config field '{name}': {e}") from None
        kwargs[name] = value
    # a stage may give defaults of its own for what was chosen (`defaults_for`): under YAML and flags
    defaults_for = getattr(cls, "defaults_for", None)
    for name, raw in (defaults_for(kwargs) if defaults_for else {}).items():
        if name not in kwargs:
            kwargs[name] = _parse_value(name, hints[name], raw)
    missing = [n for n, f in known.items()
               if n not in kwargs and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise HeedError("missing required option(s): " + ", ".join("--" + m.replace("_", "-") for m in missing))
    return cls(**kwargs)


def from_namespace(cls: type, ns: argparse.Namespace) -> Any:
    """Defaults < YAML (--config) < flags."""
    values = vars(ns).copy()
    merged: dict = YamlValues({}, "config", {})
    if "config" in values:
        data = load_yaml(values.pop("config"))
        flags = set(values)
        # a flag wins over the file's value, whichever of field_name / field-name the file used
        kept = {k: v for k, v in data.items() if not (isinstance(k, str) and k.replace("-", "_") in flags)}
        merged = YamlValues(kept, data.source, {k: n for k, n in data.lines.items() if k in kept})
    merged.update(values)
    return build(cls, merged)


def save(cfg: Any, path: str | Path) -> None:
    """Write the resolved config next to a run's outputs, so a run says how it was made."""
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
