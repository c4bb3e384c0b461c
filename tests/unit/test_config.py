from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from runtime.config import ConfigError, load_config


@dataclass
class Settings:
    listen: str = field(default="0.0.0.0:50051", metadata={"help": "address to serve on"})
    lease_ttl: int = field(default=5, metadata={"help": "lease TTL in seconds"})
    speedup: float = field(default=1.0, metadata={"help": "sim speedup"})
    tls: bool = field(default=False, metadata={"help": "serve TLS"})


def test_defaults_when_nothing_is_set() -> None:
    assert load_config(Settings, [], prog="router", env={}) == Settings()


def test_flags_beat_env_beat_file(tmp_path: Path) -> None:
    path = tmp_path / "tandem.toml"
    path.write_text('lease_ttl = 7\nspeedup = 2.0\nlisten = "file:1"\n[router]\nlisten = "router-file:1"\n')
    env = {"TANDEM_CONFIG": str(path), "TANDEM_SPEEDUP": "3.5", "TANDEM_LISTEN": "env:1"}
    settings = load_config(Settings, ["--listen", "flag:1", "--tls"], prog="router", env=env)
    assert settings == Settings(listen="flag:1", lease_ttl=7, speedup=3.5, tls=True)
    # The [router] table overrides top-level keys for the router only.
    assert load_config(Settings, [], prog="router", env={"TANDEM_CONFIG": str(path)}).listen == "router-file:1"
    assert load_config(Settings, [], prog="prefill", env={"TANDEM_CONFIG": str(path)}).listen == "file:1"


def test_bad_values_name_the_setting_and_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="TANDEM_LEASE_TTL"):
        load_config(Settings, [], prog="x", env={"TANDEM_LEASE_TTL": "five"})
    path = tmp_path / "c.toml"
    path.write_text("lease_tll = 3\n")
    with pytest.raises(ConfigError, match=r"unknown setting.*lease_tll"):
        load_config(Settings, ["--config", str(path)], prog="x", env={})
    with pytest.raises(ConfigError, match=r"no-such\.toml"):
        load_config(Settings, ["--config", str(tmp_path / "no-such.toml")], prog="x", env={})
