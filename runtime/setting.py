"""One setting, declared once: its name, type, default, allowed range and help.

A service's settings are a dataclass whose fields are declared with `setting()`:

    lease_ttl: int = setting(5, "registry lease TTL", min=2, max=3600, unit="seconds")

That one declaration is the only place the default and the range are
written. From it `runtime.config.load_config` builds the flag
(`--lease-ttl`), reads the variable (`TANDEM_LEASE_TTL`) and the TOML key
(`lease_ttl`) and checks the range at start; `runtime.config_docs` writes the
setting's row in docs/configuration.md. `check_ranges` checks an instance
built in code the same way. A bad value raises ConfigError naming the flag,
the variable and the allowed range.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ENV_PREFIX = "TANDEM_"

# A fixed tuple, or a function returning what a registry holds when the value is checked
# (engines, routing policies and KV transports register by name, plugins included).
Choices = tuple[str, ...] | Callable[[], Iterable[str]]


class ConfigError(ValueError):
    """A setting has a bad value; the message names the setting and its source."""


@dataclasses.dataclass(frozen=True)
class Range:
    """What values a setting allows. Bounds are inclusive except `above`; no bound: any value."""

    min: float | None = None
    max: float | None = None
    # Exclusive lower bound: a duration or factor that must be positive but may be tiny.
    above: float | None = None
    choices: Choices = ()
    # The value is a comma-separated list (possibly empty), each item one of `choices`.
    each: bool = False
    unit: str = ""

    def allowed(self) -> tuple[str, ...]:
        return tuple(self.choices() if callable(self.choices) else self.choices)

    def describe(self) -> str:
        """'2..3600 seconds', '>= 1', '> 0 seconds', 'one of json, text', ''; what follows 'must be'."""
        if self.choices:
            names = ", ".join(self.allowed())
            return f"a comma-separated list of {names}" if self.each else f"one of {names}"
        parts = []
        if self.min is not None and self.max is not None:
            parts.append(f"{_number(self.min)}..{_number(self.max)}")
        else:
            if self.above is not None:
                parts.append(f"> {_number(self.above)}")
            if self.min is not None:
                parts.append(f">= {_number(self.min)}")
            if self.max is not None:
                parts.append(f"<= {_number(self.max)}")
        text = " and ".join(parts)
        return f"{text} {self.unit}" if text and self.unit else text

    def check(self, value: Any) -> tuple[Any, str]:
        """(the value, '') when allowed, choices spelt as declared; else (value, what is wrong)."""
        if value is None:
            return value, ""
        if self.choices:
            return self._check_choices(str(value))
        if isinstance(value, int | float) and not isinstance(value, bool):
            out = (self.min is not None and value < self.min) or (self.max is not None and value > self.max) \
                or (self.above is not None and value <= self.above) or not math.isfinite(value)
            if out:
                return value, f"must be {self.describe() or 'finite'}, got {_number(value)}"
        return value, ""

    def _check_choices(self, text: str) -> tuple[str, str]:
        # Case-insensitive (TANDEM_LOG_LEVEL=INFO works), stored as declared.
        allowed = {name.lower(): name for name in self.allowed()}
        items = [t.strip() for t in text.split(",") if t.strip()] if self.each else [text.strip()]
        bad = [t for t in items if t.lower() not in allowed]
        if bad or (not self.each and not items):
            return text, f"must be {self.describe()}, got {text!r}"
        return ",".join(allowed[t.lower()] for t in items), ""


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def setting(default: Any, help: str, *, min: float | None = None, max: float | None = None,
            above: float | None = None, choices: Choices = (), each: bool = False, unit: str = "",
            secret: bool = False) -> Any:
    """A dataclass field declaring one setting (see the module docstring); `secret` keeps it out of repr."""
    allowed = Range(min=min, max=max, above=above, choices=choices, each=each, unit=unit)
    return dataclasses.field(default=default, repr=not secret, metadata={"help": help, "range": allowed})


@dataclasses.dataclass(frozen=True)
class Spec:
    """A declared setting as the loaders and the doc generator see it."""

    name: str
    kind: type  # str, int, float, bool or Path (an optional field: its non-None type)
    default: Any
    help: str
    range: Range

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    def problem(self, what: str, source: str = "") -> ConfigError:
        """ConfigError '--flag must be ..., got ... (env TANDEM_X; value from SOURCE)'."""
        where = f"; value from {source}" if source else ""
        return ConfigError(f"{self.flag} {what} (env {self.env}{where})")

    def convert(self, raw: Any, source: str) -> Any:
        """`raw` (flag or variable text, TOML value) as `kind`, range-checked; ConfigError otherwise."""
        value, what = _convert(self.kind, raw, self.range.each)
        if not what:
            value, what = self.range.check(value)
        if what:
            raise self.problem(what, source)
        return value


def _convert(kind: type, raw: Any, each: bool) -> tuple[Any, str]:
    if raw is None:
        return None, ""
    if kind is bool:
        if isinstance(raw, bool):
            return raw, ""
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True, ""
        if text in ("0", "false", "no", "off", ""):
            return False, ""
        return raw, f"must be true or false, got {raw!r}"
    if kind is Path:
        return Path(str(raw)).expanduser(), ""
    if kind is str:
        if each and isinstance(raw, list):  # TOML may spell a list as an array
            return ",".join(str(item) for item in raw), ""
        return str(raw), ""
    if kind in (int, float):
        noun = "an integer" if kind is int else "a number"
        # TOML true is not 1, and 2.5 does not become an integer silently.
        if isinstance(raw, bool) or (kind is int and isinstance(raw, float)) or isinstance(raw, list | dict):
            return raw, f"must be {noun}, got {raw!r}"
        try:
            return kind(raw), ""
        except ValueError:
            return raw, f"must be {noun}, got {raw!r}"
    return raw, f"has an unsupported setting type {kind!r}"


_SPECS: dict[type, tuple[Spec, ...]] = {}


def specs(cls: type) -> tuple[Spec, ...]:
    """The declared settings of dataclass `cls`, in field order (inherited ones first)."""
    if cls not in _SPECS:
        _SPECS[cls] = _read_specs(cls)
    return _SPECS[cls]


def _read_specs(cls: type) -> tuple[Spec, ...]:
    hints = typing.get_type_hints(cls)
    result = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        default = f.default if f.default is not dataclasses.MISSING else None
        result.append(Spec(f.name, kind, default, f.metadata.get("help", ""), f.metadata.get("range", Range())))
    return tuple(result)


def check_ranges(settings: object) -> None:
    """ConfigError naming the first setting of `settings` (a dataclass instance) outside its range."""
    for spec in specs(type(settings)):
        _, what = spec.range.check(getattr(settings, spec.name))
        if what:
            raise spec.problem(what)
