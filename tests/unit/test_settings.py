"""The services' settings: one owner per default, the KV transport TLS rule, range errors at start."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from controlplane.server import ControlPlaneSettings
from engine.kv.exporter import KvExporter
from engine.kv.selection import PREFERENCE, WORKER_DEFAULT, usable_transports
from router_svc import __main__ as router_main
from router_svc.models import DEFAULT_MAX_OUTPUT_TOKENS, ModelCatalog
from router_svc.policies import DEFAULT_POLICY
from router_svc.policy import PolicyConfig
from router_svc.settings import RouterSettings
from runtime.config import ConfigError, load_config
from runtime.sampling import DEFAULT_MAX_TOKENS
from worker.settings import WorkerSettings


def test_usable_transports_drop_plaintext_tcp_under_tls() -> None:
    assert usable_transports("shm, tcp,grpc,,tcp", tls=False) == ("shm", "tcp", "grpc")
    assert usable_transports(["shm", "tcp", "grpc"], tls=True) == ("shm", "grpc")
    assert RouterSettings().transports() == PREFERENCE
    assert RouterSettings(peer_ca_file=Path("ca.pem")).transports() == ("shm", "grpc")
    assert WorkerSettings(kv_transports="tcp,grpc").transports() == ["tcp", "grpc"]
    assert WorkerSettings(kv_transports="tcp,grpc", tls_cert=Path("w.pem")).transports() == ["grpc"]


def test_defaults_library_code_needs_are_the_librarys() -> None:
    router = RouterSettings()
    policy = PolicyConfig()
    assert (router.local_prefill_max_prompt_tokens, router.prefill_queue_limit_tokens, router.policy) == \
        (policy.local_prefill_max_prompt_tokens, policy.prefill_queue_limit_tokens, DEFAULT_POLICY)
    catalog = ModelCatalog({})
    assert (router.default_max_tokens, router.max_output_tokens) == \
        (catalog.default_max_tokens, catalog.default_max_output_tokens) == \
        (DEFAULT_MAX_TOKENS, DEFAULT_MAX_OUTPUT_TOKENS)
    assert WorkerSettings().kv_transports == ",".join(WORKER_DEFAULT)
    assert KvExporter.__init__.__kwdefaults__["transports"] == PREFERENCE


def test_registry_backed_choices_match_case_insensitively() -> None:
    assert load_config(WorkerSettings, ["--engine", "SIM"], prog="tandem-prefill", env={}).engine == "sim"
    assert load_config(WorkerSettings, ["--engine", "vLLM"], prog="tandem-prefill", env={}).engine == "vllm"
    with pytest.raises(ConfigError, match=r"--engine must be one of sim, torch, vllm, got 'tensorrt'"):
        load_config(WorkerSettings, [], prog="tandem-prefill", env={"TANDEM_ENGINE": "tensorrt"})
    with pytest.raises(ConfigError, match=r"--policy must be one of .*round-robin.*, got 'fastest'"):
        load_config(RouterSettings, ["--policy", "fastest"], prog="tandem-router", env={})


def test_settings_built_in_code_are_checked_the_same_way() -> None:
    with pytest.raises(ConfigError, match=r"^--probe-timeout must be 0\.05\.\.60 seconds, got 0 "
                                          r"\(env TANDEM_PROBE_TIMEOUT\)$"):
        ControlPlaneSettings(probe_timeout=0).validate()


def test_a_range_error_stops_the_router_with_status_2(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    for name in [n for n in os.environ if n.startswith("TANDEM_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("TANDEM_MAX_ATTEMPTS", "0")
    assert router_main.main([]) == 2
    assert capsys.readouterr().err == ("tandem-router: --max-attempts must be 1..100, got 0 "
                                       "(env TANDEM_MAX_ATTEMPTS; value from the environment)\n")
