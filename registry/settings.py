"""Settings every Tandem process shares (etcd access, lease, logs, metrics, readiness, TLS to peers).

Each service's settings dataclass inherits `CommonSettings`, so these flags,
TANDEM_* variables and TOML keys mean the same everywhere. Declared with
`runtime.setting.setting` (default, range and help in one place); the
reference table in docs/configuration.md is generated from them.
"""

# setting() returns a dataclasses.Field, as field() does; ruff cannot see through the wrapper.

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from registry.etcd_client import EtcdSettings
from registry.keys import DEFAULT_PREFIX, Keys
from runtime.event_loop import DEFAULT_EVENT_LOOP, EVENT_LOOPS
from runtime.peers import PeerTls
from runtime.setting import setting

# What runtime.logs.configure_logging accepts (any case: values are matched case-insensitively).
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")


@dataclass
class CommonSettings:
    etcd: str = setting("127.0.0.1:2379", "etcd endpoints, comma-separated host:port")
    etcd_prefix: str = setting(DEFAULT_PREFIX, "registry key prefix in etcd")
    etcd_ca_file: Path | None = setting(None, "CA bundle to verify etcd (enables TLS)")
    etcd_cert_file: Path | None = setting(None, "client certificate for etcd")
    etcd_key_file: Path | None = setting(None, "client key for etcd")
    etcd_tls_server_name: str = setting("", "etcd certificate name to verify")
    etcd_user: str = setting("", "etcd user (auth enabled clusters)")
    etcd_password: str = setting("", "etcd password", secret=True)
    etcd_timeout: float = setting(2.0, "deadline of each etcd call", above=0, max=600, unit="seconds")
    # Keepalives go every TTL/3: under 2 s they would race the lease itself.
    lease_ttl: int = setting(5, "registry lease TTL (keepalive every TTL/3)", min=2, max=3600, unit="seconds")
    log_level: str = setting("info", "least severe log level written", choices=LOG_LEVELS)
    log_format: str = setting("json", "json (one object per line) or text", choices=LOG_FORMATS)
    event_loop: str = setting(DEFAULT_EVENT_LOOP, "asyncio event loop to run on (auto: uvloop when it can be "
                              "imported, else asyncio's own; uvloop costs less CPU per request)", choices=EVENT_LOOPS)
    metrics_listen: str = setting("", "serve Prometheus /metrics on HOST:PORT (empty: off)")
    ready_file: Path | None = setting(
        None, "write JSON with the bound endpoints here once serving (supervisors wait for it)")
    shutdown_grace: float = setting(15.0, "time to finish in-flight work on stop", min=0, max=3600,
                                    unit="seconds")
    peer_ca_file: Path | None = setting(
        None, "CA bundle to verify other Tandem services this process calls (enables TLS to workers)")
    peer_cert_file: Path | None = setting(None, "client certificate presented to other Tandem services (mutual TLS)")
    peer_key_file: Path | None = setting(None, "private key of --peer-cert-file")
    peer_tls_server_name: str = setting(
        "", "certificate name to verify on other Tandem services (one shared name for a fleet)")
    peer_verify_identity: bool = setting(
        False, "check that a worker's certificate names the worker and node of the registry record it was "
               "dialed for (certificates from `tandemctl certs`; docs/security.md)")

    def etcd_settings(self) -> EtcdSettings:
        return EtcdSettings.parse(
            self.etcd,
            ca_file=self.etcd_ca_file,
            cert_file=self.etcd_cert_file,
            key_file=self.etcd_key_file,
            tls_server_name=self.etcd_tls_server_name,
            user=self.etcd_user,
            password=self.etcd_password,
            timeout=self.etcd_timeout,
        )

    def keys(self) -> Keys:
        return Keys(self.etcd_prefix)

    def peer_tls(self) -> PeerTls | None:
        """How to call other Tandem services (workers): None for plaintext."""
        if self.peer_ca_file is None:
            if self.peer_verify_identity:
                raise ValueError("--peer-verify-identity needs --peer-ca-file (TLS to other services)")
            if self.peer_cert_file or self.peer_key_file:
                raise ValueError("--peer-cert-file and --peer-key-file need --peer-ca-file (TLS to other services)")
            return None
        if bool(self.peer_cert_file) != bool(self.peer_key_file):
            raise ValueError("--peer-cert-file and --peer-key-file go together")
        return PeerTls(self.peer_ca_file, self.peer_cert_file, self.peer_key_file, self.peer_tls_server_name,
                       verify_identity=self.peer_verify_identity)
