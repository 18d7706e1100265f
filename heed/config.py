"""Stage configs: one dataclass per stage, the CLI generated from it.

Every field is declared with `option(default, "one-line help")`. The same
dataclass gives `heed STAGE --help`, the command-line flags, and the keys a
YAML file may set (`--config FILE.yaml`). Precedence: defaults < YAML < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
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


def _parse_value(name: str, tp: Any, raw: Any) -> Any:
    """Convert a CLI string or YAML value to the field's type, with a clear error."""
    base, optional = _base_type(tp)
    if raw is None or (optional and isinstance(raw, str) and raw.lower() in ("none", "null", "")):
        if optional:
            return None
        raise HeedError(f"config field '{name}' may not be empty")
    origin = typing.get_origin(base)
    try:
        if origin is list:
            (item,) = typing.get_args(base) or (str,)
            if isinstance(raw, str):
                raw = [p.strip() for p in raw.split(",") if p.strip()]
            return [item(x) for x in raw]
        if base is bool:
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("1", "true", "yes", "on"):
                return True
            if str(raw).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if base is float and isinstance(raw, str):
            return float(raw)
        if base is int and isinstance(raw, float) and raw.is_integer():
            return int(raw)
        return base(raw)
    except (TypeError, ValueError):
        kind = getattr(base, "__name__", str(base))
        raise HeedError(f"config field '{name}': expected {kind}, got {raw!r}") from None


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


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise HeedError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise HeedError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise HeedError(f"{path}: expected a mapping of field: value at the top level")
    return data


def build(cls: type, values: dict, source: str = "config") -> Any:
    """Instantiate `cls` from a dict of raw values, checking names, types and required fields."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, raw in values.items():
        name = key.replace("-", "_")
        if name not in known:
            raise HeedError(f"{source}: unknown field '{key}' (known: {', '.join(sorted(known))})")
        kwargs[name] = _parse_value(name, hints[name], raw)
    missing = [n for n, f in known.items()
               if n not in kwargs and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise HeedError("missing required option(s): " + ", ".join("--" + m.replace("_", "-") for m in missing))
    return cls(**kwargs)


def from_namespace(cls: type, ns: argparse.Namespace) -> Any:
    """Defaults < YAML (--config) < flags."""
    values = vars(ns).copy()
    merged: dict = {}
    if "config" in values:
        path = values.pop("config")
        merged.update(load_yaml(path))
        source = str(path)
    else:
        source = "config"
    merged.update(values)
    return build(cls, merged, source)


def save(cfg: Any, path: str | Path) -> None:
    """Write the resolved config next to a run's outputs, so a run says how it was made."""
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
