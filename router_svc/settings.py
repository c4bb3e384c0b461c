"""tandem-router's settings: flags, TANDEM_* variables and the [router] table of the TOML file.

A default that library code also needs (the policy's thresholds, max_tokens,
the KV transport preference) is owned by that library and referenced here;
every other default, and every range and help text, is declared only here.
"""

# setting() returns a dataclasses.Field, as field() does; ruff cannot see through the wrapper.

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from engine.kv.selection import PREFERENCE, known_transports, usable_transports
from registry.keys import check_name
from registry.settings import CommonSettings
from router_svc.demand_window import DEFAULT_WINDOW_S
from router_svc.inference import DEFAULT_STREAM_INTERVAL_MS
from router_svc.models import DEFAULT_MAX_OUTPUT_TOKENS
from router_svc.policies import DEFAULT_POLICY, policy_names
from router_svc.policy import PolicyConfig
from runtime.sampling import DEFAULT_MAX_TOKENS
from runtime.setting import setting


@dataclass
class RouterSettings(CommonSettings):
    listen: str = setting("0.0.0.0:50051", "gRPC listen address for clients")
    advertise_host: str = setting("", "host clients use to reach this router")
    processes: int = setting(
        1, "router processes on this host, all serving the same gRPC and HTTP ports (SO_REUSEPORT), each with "
        "its own registry view, metrics port (the next port up each) and router id (suffixed -0, -1, ...); "
        "0: one per CPU core this process may use", min=0, max=256)
    reuse_port: bool = setting(False, "share the gRPC and HTTP ports with other processes on this host "
                               "(SO_REUSEPORT; --processes sets it for its children)")
    http_listen: str = setting("", "serve the OpenAI-compatible HTTP API on HOST:PORT (empty: off)")
    http_api_keys_file: Path | None = setting(
        None, "HTTP API keys, one per line; re-read when the file changes (unset, with no --http-api-keys: no auth)")
    http_api_keys: str = setting("", "comma-separated HTTP API keys (prefer the variable or the file: "
                                 "flags show in ps)", secret=True)
    policy: str = setting(DEFAULT_POLICY, "routing policy", choices=policy_names)
    local_prefill_max_prompt_tokens: int = setting(
        PolicyConfig.local_prefill_max_prompt_tokens,
        "prompts up to this many tokens are prefilled on the decode worker", min=0, unit="tokens")
    prefill_queue_limit_tokens: int = setting(
        PolicyConfig.prefill_queue_limit_tokens,
        "a prefill worker with more queued tokens is saturated (prefill locally instead)", min=1, unit="tokens")
    capacity_wait_s: float = setting(
        5.0, "how long a request waits for a free worker before RESOURCE_EXHAUSTED / UNAVAILABLE",
        min=0, max=3600, unit="seconds")
    max_attempts: int = setting(8, "worker calls one request may make", min=1, max=100)
    stall_timeout_s: float = setting(30.0, "a decode stream silent this long is treated as dead and migrated",
                                     above=0, max=3600, unit="seconds")
    suspect_s: float = setting(5.0, "how long a failed worker is avoided by all requests", min=0, max=3600,
                               unit="seconds")
    kv_transports: str = setting(",".join(PREFERENCE), "KV transports to ask prefill workers for, best first "
                                 "(tcp is left out under TLS to workers)", choices=known_transports, each=True)
    tokenizer: str = setting("", "MODEL=PATH[,MODEL=PATH...]: tokenizer directories")
    stream_interval_ms: int = setting(
        DEFAULT_STREAM_INTERVAL_MS, "a streamed answer gets at most one message per this many ms: tokens that "
        "come faster travel together (0: each as the decode worker sends it)", min=0, max=1000, unit="ms")
    default_max_tokens: int = setting(DEFAULT_MAX_TOKENS, "max_tokens when a request sets none", min=1,
                                      unit="tokens")
    max_output_tokens: int = setting(DEFAULT_MAX_OUTPUT_TOKENS, "max_tokens limit when a model spec sets none",
                                     min=1, unit="tokens")
    router_id: str = setting("", "name of this router in the registry (its demand report's key; "
                             "default HOSTNAME-PID)")
    demand_window_s: float = setting(DEFAULT_WINDOW_S, "the traffic summary the planner reads covers the last "
                                     "this many seconds", min=1, max=3600, unit="seconds")
    demand_interval_s: float = setting(5.0, "how often the traffic summary is written to the registry",
                                       min=0.1, max=600, unit="seconds")
    tls_cert: Path | None = setting(None, "serve TLS with this certificate (gRPC and HTTP ports)")
    tls_key: Path | None = setting(None, "private key of --tls-cert")
    tls_client_ca: Path | None = setting(None, "require client certificates from this CA")

    def resolved_router_id(self) -> str:
        """--router-id, or HOSTNAME-PID; ValueError when it cannot be a registry key segment."""
        return check_name(self.router_id or f"{socket.gethostname()}-{os.getpid()}", "router_id")

    def transports(self) -> tuple[str, ...]:
        """The KV transports to ask for: the setting, less what TLS to workers rules out."""
        return usable_transports(self.kv_transports, tls=self.peer_ca_file is not None)
