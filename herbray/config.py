"""Job configs as dataclasses: defaults, then a YAML file, then command-line flags.

Each job (prepare, train, label, evaluate) has one dataclass. A field is
declared once with :func:`option`, whose help text serves both the command
line and the saved config, and the class validates itself in
``__post_init__``. The resolved config is written next to the job's outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

import yaml

from herbray import storage


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and the value."""


def option(
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    flag: bool = True,
    positional: bool = False,
) -> Any:
    """Declare a config field with its help text (shown by ``--help``).

    ``flag=False`` keeps a field out of the command line (set by code or YAML).
    """
    metadata = {"help": help, "choices": choices, "flag": flag, "positional": positional}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _field_type(cls: type, field: dataclasses.Field) -> tuple[type, bool]:
    """The plain type of a field and whether it may be None."""
    hints = typing.get_type_hints(cls)
    hint = hints[field.name]
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    origin = typing.get_origin(hint)
    return (origin or hint), optional


def _parse_tuple(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one command-line option per field of a config dataclass.

    Every option defaults to None, so :func:`resolve` can tell which fields the
    command line set and let those override the YAML file.
    """
    for field in dataclasses.fields(cls):
        if not field.metadata.get("flag", True):
            continue
        kind, _ = _field_type(cls, field)
        default = (
            field.default if field.default is not dataclasses.MISSING else field.default_factory()
        )
        help_text = field.metadata.get("help", "")
        if default not in (None, "", [], ()):
            help_text += f" (default: {_format_default(default)})"
        name = "--" + field.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": field.name, "default": None, "help": help_text}
        if field.metadata.get("choices"):
            kwargs["choices"] = field.metadata["choices"]
        if field.metadata.get("positional"):
            parser.add_argument(field.name, help=help_text, nargs="?", default=None)
            continue
        if kind is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, **kwargs)
        elif kind is tuple:
            parser.add_argument(name, type=_parse_tuple, metavar="A,B,...", **kwargs)
        elif kind is list:
            parser.add_argument(name, nargs="+", **kwargs)
        else:
            parser.add_argument(name, type=kind, **kwargs)


def _format_default(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def load_yaml(uri: str) -> dict:
    try:
        data = yaml.safe_load(storage.read_text(uri)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{uri}: invalid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{uri}: expected a mapping of option names to values at the top level")
    return data


def from_dict(cls: type, values: dict, source: str) -> Any:
    """Build a config from a dict, rejecting keys the dataclass does not have."""
    names = {f.name for f in dataclasses.fields(cls)}
    normalised = {key.replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(normalised) - names)
    if unknown:
        raise ConfigError(
            f"{source}: unknown option(s) {', '.join(unknown)}; valid options are "
            f"{', '.join(sorted(names))}"
        )
    for field in dataclasses.fields(cls):
        kind, _ = _field_type(cls, field)
        value = normalised.get(field.name)
        if kind is tuple and isinstance(value, list | str):
            normalised[field.name] = tuple(_parse_tuple(value) if isinstance(value, str) else value)
    return cls(**normalised)


def resolve(
    cls: type,
    args: argparse.Namespace | None = None,
    config_file: str | None = None,
    **overrides: Any,
) -> Any:
    """Merge defaults, then the YAML file, then command-line flags, then ``overrides``."""
    values: dict[str, Any] = {}
    if config_file:
        values.update({k.replace("-", "_"): v for k, v in load_yaml(config_file).items()})
    if args is not None:
        for field in dataclasses.fields(cls):
            value = getattr(args, field.name, None)
            if value is not None:
                values[field.name] = value
    values.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(cls, values, config_file or "command line")


def to_dict(config: Any) -> dict:
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        out[field.name] = list(value) if isinstance(value, tuple) else value
    return out


def save(config: Any, uri: str) -> None:
    """Write the resolved config as YAML, each field with its help as a comment."""
    lines = [f"# herbray {type(config).__name__}: the resolved settings of this run"]
    for field in dataclasses.fields(config):
        help_text = field.metadata.get("help")
        if help_text:
            lines.append(f"# {help_text}")
        value = getattr(config, field.name)
        value = list(value) if isinstance(value, tuple) else value
        dumped = yaml.safe_dump({field.name: value}, allow_unicode=True, default_flow_style=False)
        lines.append(dumped.rstrip("\n"))
    storage.write_text(uri, "\n".join(lines) + "\n")


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
