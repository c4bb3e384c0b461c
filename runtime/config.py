"""Layered configuration: command-line flags > TANDEM_* environment > TOML file > defaults.

A service declares its settings as a dataclass of `runtime.setting.setting`
fields; `load_config` builds the argparse parser from it, so a flag, its
variable and its file key always share one name:

    field `kv_transports`  ->  flag --kv-transports,  env TANDEM_KV_TRANSPORTS,
                               TOML key kv_transports (or kv-transports)

The TOML file is named by --config or TANDEM_CONFIG. Its top-level keys apply
to every service; a table named after the service (`[router]`, `[prefill]`)
overrides them for that service, so one /etc/tandem/tandem.toml can serve a
whole node. Every value is converted and range-checked the same way
whatever its source; a bad one is a ConfigError naming the flag, the
variable, the allowed range and where the value came from.

Unknown names warn, they do not stop the service (the same rule for a
TANDEM_* variable and a TOML key, each warning naming the closest setting):
the environment is not Tandem's alone, and one tandem.env and tandem.toml
serve every service of a node, across releases during a rolling upgrade, so
a name this binary does not know may be right for another. Names that are
settings of any other Tandem service (runtime.setting_names, generated) are
accepted silently in the shared scopes: the environment and top-level keys.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import tomllib
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from runtime.setting import ENV_PREFIX, ConfigError, Spec, specs
from runtime.setting_names import SETTINGS_BY_SECTION

__all__ = ["ENV_PREFIX", "OTHER_VARIABLES", "ConfigError", "build_parser", "load_config", "unknown_variables"]

T = TypeVar("T")
Warn = Callable[[str], None]

# TANDEM_* variables that are not settings: read by load_config itself, the GPU
# catalog, tandemctl, and the soak test. Exported in a shell, services see them too.
OTHER_VARIABLES = frozenset({
    "TANDEM_CONFIG", "TANDEM_GPU_CATALOG", "TANDEM_ENDPOINT", "TANDEM_ROUTER", "TANDEM_ADMIN_TOKEN",
    "TANDEM_ADMIN_TIMEOUT", "TANDEM_ADMIN_CA_FILE", "TANDEM_ADMIN_CERT_FILE", "TANDEM_ADMIN_KEY_FILE",
    "TANDEM_ROUTER_CA_FILE", "TANDEM_ROUTER_CERT_FILE", "TANDEM_ROUTER_KEY_FILE", "TANDEM_SOAK_SECONDS",
})


def build_parser(cls: type, prog: str, description: str = "") -> argparse.ArgumentParser:
    """An argparse parser with one flag per declared setting (defaults left unset: None means 'not given')."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=f"Every flag can also be set as {ENV_PREFIX}<NAME> in the environment or as a key "
        f"in the TOML file named by --config; flags win over the environment, which wins over the file.",
    )
    parser.add_argument("--config", type=Path, default=None, help="TOML file (env TANDEM_CONFIG)")
    for spec in specs(cls):
        allowed = spec.range.describe()
        about = f"{spec.help} ({allowed + '; ' if allowed else ''}env {spec.env}; default {spec.default!r})"
        if spec.kind is bool:
            parser.add_argument(spec.flag, dest=spec.name, action=argparse.BooleanOptionalAction, default=None,
                                help=about)
        else:
            parser.add_argument(spec.flag, dest=spec.name, default=None, metavar=spec.name.upper(), help=about)
    return parser


def load_config(
    cls: type[T],
    argv: Sequence[str] | None = None,
    *,
    prog: str,
    section: str = "",
    env: Mapping[str, str] | None = None,
    description: str = "",
    warn: Warn | None = None,
    known: Mapping[str, Collection[str]] | None = None,
) -> T:
    """Parse argv, the environment and the TOML file into a `cls` instance, every value range-checked.

    `section` (default `prog`) names the service's TOML table. Unknown
    TANDEM_* variables and TOML keys go to `warn` (default: a
    "PROG: warning: ..." line on stderr, like config errors). `known` maps
    each service's table to its setting names (default: every Tandem
    service's). Raises ConfigError for bad values; argparse exits with status
    2 for unknown flags, as every CLI does.
    """
    env = os.environ if env is None else env
    section = section or prog
    warn = warn or _stderr(prog)
    by_name = {spec.name: spec for spec in specs(cls)}
    known = {**(SETTINGS_BY_SECTION if known is None else known), section: set(by_name)}
    args = build_parser(cls, prog, description).parse_args(argv)
    config_path = args.config or (Path(env["TANDEM_CONFIG"]) if env.get("TANDEM_CONFIG") else None)
    file_values: dict[str, tuple[Any, str]] = {}
    if config_path is not None:
        file_values, notes = _file_values(config_path, section, known)
        for note in notes:
            warn(note)
    for note in unknown_variables(env, known):
        warn(note)
    values: dict[str, Any] = {}
    for name, spec in by_name.items():
        picked = _pick(spec, getattr(args, name), env, file_values)
        if picked is not None:
            values[name] = spec.convert(*picked)
    return cls(**values)


def _pick(spec: Spec, flag_value: Any, env: Mapping[str, str],
          file_values: Mapping[str, tuple[Any, str]]) -> tuple[Any, str] | None:
    """(raw value, where it came from) by precedence, or None for the default."""
    if flag_value is not None:
        return flag_value, "the command line"
    if spec.env in env:
        return env[spec.env], "the environment"
    return file_values.get(spec.name)


def _stderr(prog: str) -> Warn:
    def warn(message: str) -> None:
        print(f"{prog}: warning: {message}", file=sys.stderr)
    return warn


def _file_values(path: Path, section: str,
                 known: Mapping[str, Collection[str]]) -> tuple[dict[str, tuple[Any, str]], list[str]]:
    """{setting: (value, source)} for `section` from the TOML file at `path`, and warnings about unknown names."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    own = known[section]
    everyone = _union(known)
    top = {key.replace("-", "_"): value for key, value in data.items() if not isinstance(value, dict)}
    tables = {key: value for key, value in data.items() if isinstance(value, dict)}
    table = {key.replace("-", "_"): value for key, value in tables.get(section, {}).items()}
    # Top-level keys are shared by every service (like the environment): a setting of any is fine.
    notes = [_note(f"key {key} in {path}", "a Tandem setting", _closest(key, everyone))
             for key in sorted(top) if key not in everyone]
    notes += [_note(f"table [{name}] in {path}", "a Tandem service's table", f"[{_closest(name, known)}]")
              for name in sorted(tables) if name not in known]
    # A service's table is addressed to it alone: another service's setting there is misplaced.
    for key in sorted(set(table) - set(own)):
        owners = ", ".join(f"[{name}]" for name, names in sorted(known.items()) if key in names)
        closest = f"{key} in {owners}" if owners else _closest(key, own)
        notes.append(_note(f"key {key} in [{section}] of {path}", f"a {section} setting", closest))
    values = {key: (value, f"{path}") for key, value in top.items() if key in own}
    values.update({key: (value, f"{path} [{section}]") for key, value in table.items() if key in own})
    return values, notes


def unknown_variables(names: Iterable[str], known: Mapping[str, Collection[str]]) -> list[str]:
    """One warning per TANDEM_* name in `names` that no Tandem service reads, naming the closest setting.

    `known` maps each service's TOML table to its setting names. A variable
    that is a setting of any service is fine: tandem.env is shared by every
    unit of a host. One with a service prefix (TANDEM_ROUTER_POLICY) is
    matched against that service's settings and told that Tandem's variables
    take no prefix.
    """
    everyone = _union(known)
    notes = []
    for var in sorted(n for n in names if n.startswith(ENV_PREFIX) and n not in OTHER_VARIABLES):
        name = var.removeprefix(ENV_PREFIX).lower()
        if name in everyone:
            continue
        service, _, rest = name.partition("_")
        if rest and service in known:
            hint = (" (Tandem variables take no service prefix: put the service's own values in its "
                    f"environment file or the [{service}] table of the TOML file)")
            notes.append(_note(var, "a Tandem setting", _env(_closest(rest, known[service])), hint))
        else:
            notes.append(_note(var, "a Tandem setting", _env(_closest(name, everyone))))
    return notes


def _note(what: str, scope: str, closest: str, hint: str = "") -> str:
    # One shape for every unknown name, whichever file or variable it came from.
    return f"{what} is not {scope} and is ignored; the closest is {closest}{hint}"


def _env(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _union(known: Mapping[str, Collection[str]]) -> set[str]:
    return {name for names in known.values() for name in names}


def _closest(name: str, candidates: Iterable[str]) -> str:
    """The candidate most like `name` (difflib's ratio), however unlike: the warning always names one."""
    found = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.0)
    return found[0] if found else "?"
