"""runtime.config.load_config: precedence, conversion, ranges, and the one rule for unknown names."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from runtime.config import ConfigError, load_config, unknown_variables
from runtime.setting import setting

# Another service's settings, as runtime.setting_names lists them: shared files may name them.
KNOWN = {"router": {"listen", "lease_ttl", "speedup", "tls", "log_level", "kv_transports"},
         "prefill": {"listen", "lease_ttl", "max_batch_size"}}


@dataclass
class Settings:
    listen: str = setting("0.0.0.0:50051", "address to serve on")
    lease_ttl: int = setting(5, "lease TTL", min=2, max=3600, unit="seconds")
    speedup: float = setting(1.0, "sim speedup", above=0)
    tls: bool = setting(False, "serve TLS")
    log_level: str = setting("info", "log level", choices=("debug", "info"))
    kv_transports: str = setting("grpc", "transports", choices=("grpc", "shm", "tcp"), each=True)


def load(argv: list[str] | None = None, env: dict[str, str] | None = None, prog: str = "router",
         notes: list[str] | None = None) -> Settings:
    return load_config(Settings, argv or [], prog=prog, env=env or {}, known=KNOWN,
                       warn=(notes if notes is not None else []).append)


def test_defaults_when_nothing_is_set() -> None:
    assert load() == Settings()


def test_flags_beat_env_beat_file(tmp_path: Path) -> None:
    path = tmp_path / "tandem.toml"
    path.write_text('lease_ttl = 7\nspeedup = 2.0\nlisten = "file:1"\n[router]\nlisten = "router-file:1"\n')
    env = {"TANDEM_CONFIG": str(path), "TANDEM_SPEEDUP": "3.5", "TANDEM_LISTEN": "env:1"}
    assert load(["--listen", "flag:1", "--tls"], env) == Settings(listen="flag:1", lease_ttl=7, speedup=3.5, tls=True)
    # The [router] table overrides top-level keys for the router only.
    assert load(env={"TANDEM_CONFIG": str(path)}).listen == "router-file:1"
    assert load(env={"TANDEM_CONFIG": str(path)}, prog="prefill").listen == "file:1"


def test_bad_values_name_the_flag_the_variable_the_range_and_the_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--lease-ttl must be an integer, got 'five' "
                                          r"\(env TANDEM_LEASE_TTL; value from the environment\)$"):
        load(env={"TANDEM_LEASE_TTL": "five"})
    with pytest.raises(ConfigError, match=r"^--lease-ttl must be 2\.\.3600 seconds, got 1 "
                                          r"\(env TANDEM_LEASE_TTL; value from the command line\)$"):
        load(["--lease-ttl", "1"])
    path = tmp_path / "c.toml"
    path.write_text("[router]\nspeedup = 0\n")
    with pytest.raises(ConfigError, match=rf"^--speedup must be > 0, got 0 \(env TANDEM_SPEEDUP; value from "
                                          rf"{re.escape(str(path))} \[router\]\)$"):
        load(["--config", str(path)])
    path.write_text("lease_ttl = 2.5\n")  # TOML keeps the type: no silent truncation
    with pytest.raises(ConfigError, match=r"--lease-ttl must be an integer, got 2\.5"):
        load(["--config", str(path)])
    with pytest.raises(ConfigError, match=r"--log-level must be one of debug, info, got 'loud'"):
        load(env={"TANDEM_LOG_LEVEL": "loud"})
    with pytest.raises(ConfigError, match=r"--kv-transports must be a comma-separated list of grpc, shm, tcp, "
                                          r"got 'grpc,rdma'"):
        load(["--kv-transports", "grpc,rdma"])


def test_unreadable_or_malformed_files_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no-such\.toml"):
        load(["--config", str(tmp_path / "no-such.toml")])
    path = tmp_path / "bad.toml"
    path.write_text("lease_ttl = \n")
    with pytest.raises(ConfigError, match=r"config file .*bad\.toml"):
        load(["--config", str(path)])


def test_choices_match_any_case_and_are_stored_as_declared(tmp_path: Path) -> None:
    assert load(env={"TANDEM_LOG_LEVEL": "INFO"}).log_level == "info"
    assert load(["--kv-transports", " SHM, grpc,,"]).kv_transports == "shm,grpc"
    path = tmp_path / "t.toml"
    path.write_text('kv_transports = ["tcp", "grpc"]\n')  # a TOML array works for a list setting
    assert load(["--config", str(path)]).kv_transports == "tcp,grpc"


def test_an_unknown_variable_warns_naming_the_closest_setting() -> None:
    notes: list[str] = []
    settings = load(env={"TANDEM_LEASE_TLL": "3", "TANDEM_ROUTER_FOO": "1", "TANDEM_ROUTER_LISTEN": "x:1"},
                    notes=notes)
    assert settings == Settings(), "unknown names are ignored"
    assert notes[0].startswith("TANDEM_LEASE_TLL is not a Tandem setting and is ignored; the closest is "
                               "TANDEM_LEASE_TTL")
    # A service prefix: matched against that service's settings, with a word on where such values go.
    assert notes[1].startswith("TANDEM_ROUTER_FOO is not a Tandem setting and is ignored; the closest is TANDEM_")
    assert "take no service prefix" in notes[1] and "[router] table" in notes[1]
    assert notes[2].startswith("TANDEM_ROUTER_LISTEN is not a Tandem setting and is ignored; the closest is "
                               "TANDEM_LISTEN")
    assert len(notes) == 3


def test_variables_of_other_services_and_tools_pass_silently() -> None:
    """tandem.env is read by every unit of a host: the router sees the workers' settings too."""
    notes: list[str] = []
    env = {"TANDEM_MAX_BATCH_SIZE": "64", "TANDEM_CONFIG": "", "TANDEM_GPU_CATALOG": "/x", "PATH": "/bin",
           "TANDEM_ENDPOINT": "h:1"}
    load(env=env, notes=notes)
    assert notes == []
    assert unknown_variables(["TANDEM_MAX_BATCH_SIZ", "HOME"], KNOWN) == [
        "TANDEM_MAX_BATCH_SIZ is not a Tandem setting and is ignored; the closest is TANDEM_MAX_BATCH_SIZE"]


def test_unknown_file_keys_warn_the_same_way(tmp_path: Path) -> None:
    path = tmp_path / "tandem.toml"
    path.write_text('lease_tll = 3\nmax_batch_size = 8\n[routr]\nx = 1\n'
                    '[router]\nmax_batch_size = 8\nlisten-addr = "a:1"\nspeedup = 2.0\n'
                    '[prefill]\nnonsense = 1\n')
    notes: list[str] = []
    settings = load(["--config", str(path)], notes=notes)
    assert settings == Settings(speedup=2.0)
    assert notes == [
        f"key lease_tll in {path} is not a Tandem setting and is ignored; the closest is lease_ttl",
        f"table [routr] in {path} is not a Tandem service's table and is ignored; the closest is [router]",
        f"key listen_addr in [router] of {path} is not a router setting and is ignored; the closest is listen",
        f"key max_batch_size in [router] of {path} is not a router setting and is ignored; the closest is "
        "max_batch_size in [prefill]",
    ], "a top-level key of another service is fine; another service's table is its business"


def test_warnings_go_to_stderr_by_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    load_config(Settings, [], prog="tandem-router", section="router", env={"TANDEM_ROUTER_FOO": "1"}, known=KNOWN)
    err = capsys.readouterr().err
    assert err.startswith("tandem-router: warning: TANDEM_ROUTER_FOO is not a Tandem setting")
    assert err.count("\n") == 1
