"""Layered configuration: command-line flags > TANDEM_* environment > TOML file > defaults.

A service declares its settings as a dataclass whose fields carry a `help`
metadata entry; `load_config` builds the argparse parser from it, so flags,
environment variables and file keys always have the same names:

    field `kv_transport`  ->  flag --kv-transport,  env TANDEM_KV_TRANSPORT,
                              TOML key kv_transport (or kv-transport)

The TOML file is named by --config or TANDEM_CONFIG. Its top-level keys apply
to every service; a table named after the service (`[router]`, `[prefill]`)
overrides them for that service, so one /etc/tandem/tandem.toml can serve a
whole node. Unknown keys in the file are an error (a typo must not be
silently ignored).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ENV_PREFIX = "TANDEM_"


class ConfigError(ValueError):
    """A setting has a bad value; the message names the setting and its source."""


def _field_type(cls: type, f: dataclasses.Field[Any]) -> type:
    hints = typing.get_type_hints(cls)
    hint = hints[f.name]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0]
    return hint


def _convert(kind: type, raw: Any, name: str, source: str) -> Any:
    if raw is None:
        return None
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(f"not a boolean: {raw!r}")
        if kind is Path:
            return Path(str(raw)).expanduser()
        if kind in (int, float, str):
            if kind is int and isinstance(raw, float):
                raise ValueError(f"not an integer: {raw!r}")
            return kind(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} from {source}: {exc}") from None
    raise ConfigError(f"{name}: unsupported setting type {kind!r}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(cls: type, prog: str, description: str = "") -> argparse.ArgumentParser:
    """An argparse parser with one flag per dataclass field (defaults left unset)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=f"Every flag can also be set as {ENV_PREFIX}<NAME> in the environment or as a key "
        f"in the TOML file named by --config; flags win over the environment, which wins over the file.",
    )
    parser.add_argument("--config", type=Path, default=None, help="TOML file (env TANDEM_CONFIG)")
    for f in dataclasses.fields(cls):
        kind = _field_type(cls, f)
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "")
        env_name = ENV_PREFIX + f.name.upper()
        if kind is bool:
            parser.add_argument(
                _flag(f.name),
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{help_text} (env {env_name}; default {default})",
            )
        else:
            parser.add_argument(
                _flag(f.name),
                dest=f.name,
                default=None,
                metavar=f.name.upper(),
                help=f"{help_text} (env {env_name}; default {default!r})",
            )
    return parser


def _file_values(path: Path, section: str, valid: set[str]) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    values: dict[str, Any] = {}
    sections = {k for k, v in data.items() if isinstance(v, dict)}
    for key, value in data.items():
        if isinstance(value, dict):
            continue
        values[key.replace("-", "_")] = value
    if section in sections:
        for key, value in data[section].items():
            values[key.replace("-", "_")] = value
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")
    return values


def load_config(
    cls: type[T],
    argv: Sequence[str] | None = None,
    *,
    prog: str,
    section: str = "",
    env: Mapping[str, str] | None = None,
    description: str = "",
) -> T:
    """Parse argv, the environment and the TOML file into a `cls` instance.

    Raises ConfigError for values that do not convert; argparse exits with
    status 2 for unknown flags, as every CLI does.
    """
    env = os.environ if env is None else env
    parser = build_parser(cls, prog, description)
    args = parser.parse_args(argv)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    config_path = args.config or (Path(env["TANDEM_CONFIG"]) if env.get("TANDEM_CONFIG") else None)
    file_values = _file_values(config_path, section or prog, set(fields)) if config_path else {}
    values: dict[str, Any] = {}
    for name, f in fields.items():
        kind = _field_type(cls, f)
        flag_value = getattr(args, name)
        env_name = ENV_PREFIX + name.upper()
        if flag_value is not None:
            values[name] = _convert(kind, flag_value, _flag(name), "the command line")
        elif env_name in env:
            values[name] = _convert(kind, env[env_name], name, f"environment {env_name}")
        elif name in file_values:
            values[name] = _convert(kind, file_values[name], name, f"config file {config_path}")
    return cls(**values)
