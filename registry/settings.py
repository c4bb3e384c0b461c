"""Settings every Tandem process shares (etcd access, lease, logs, metrics, readiness).

Each service's settings dataclass inherits `CommonSettings`, so the flags,
TANDEM_* variables and TOML keys below mean the same everywhere:

    --etcd HOST:PORT[,...]   --etcd-prefix /tandem   --lease-ttl 5
    --etcd-ca-file / --etcd-cert-file / --etcd-key-file / --etcd-tls-server-name
    --etcd-user / --etcd-password (or TANDEM_ETCD_PASSWORD)
    --log-level info  --log-format json|text  --metrics-listen HOST:PORT
    --ready-file PATH  --shutdown-grace SECONDS
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from registry.etcd_client import EtcdSettings
from registry.keys import DEFAULT_PREFIX, Keys
from runtime.peers import PeerTls


@dataclass
class CommonSettings:
    etcd: str = field(default="127.0.0.1:2379", metadata={"help": "etcd endpoints, comma-separated host:port"})
    etcd_prefix: str = field(default=DEFAULT_PREFIX, metadata={"help": "registry key prefix in etcd"})
    etcd_ca_file: Path | None = field(default=None, metadata={"help": "CA bundle to verify etcd (enables TLS)"})
    etcd_cert_file: Path | None = field(default=None, metadata={"help": "client certificate for etcd"})
    etcd_key_file: Path | None = field(default=None, metadata={"help": "client key for etcd"})
    etcd_tls_server_name: str = field(default="", metadata={"help": "etcd certificate name to verify"})
    etcd_user: str = field(default="", metadata={"help": "etcd user (auth enabled clusters)"})
    etcd_password: str = field(default="", repr=False, metadata={"help": "etcd password"})
    etcd_timeout: float = field(default=2.0, metadata={"help": "deadline of each etcd call, seconds"})
    lease_ttl: int = field(default=5, metadata={"help": "registry lease TTL, seconds (keepalive every TTL/3)"})
    log_level: str = field(default="info", metadata={"help": "debug, info, warning, error"})
    log_format: str = field(default="json", metadata={"help": "json (one object per line) or text"})
    metrics_listen: str = field(default="", metadata={"help": "serve Prometheus /metrics on HOST:PORT"})
    ready_file: Path | None = field(default=None, metadata={
        "help": "write JSON with the bound endpoints here once serving (supervisors wait for it)"})
    shutdown_grace: float = field(default=15.0, metadata={"help": "seconds to finish in-flight work on stop"})
    peer_ca_file: Path | None = field(default=None, metadata={
        "help": "CA bundle to verify other Tandem services this process calls (enables TLS to workers)"})
    peer_cert_file: Path | None = field(default=None, metadata={
        "help": "client certificate presented to other Tandem services (mutual TLS)"})
    peer_key_file: Path | None = field(default=None, metadata={"help": "private key of --peer-cert-file"})
    peer_tls_server_name: str = field(default="", metadata={
        "help": "certificate name to verify on other Tandem services (one shared name for a fleet)"})

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
            if self.peer_cert_file or self.peer_key_file:
                raise ValueError("--peer-cert-file and --peer-key-file need --peer-ca-file (TLS to other services)")
            return None
        if bool(self.peer_cert_file) != bool(self.peer_key_file):
            raise ValueError("--peer-cert-file and --peer-key-file go together")
        return PeerTls(self.peer_ca_file, self.peer_cert_file, self.peer_key_file, self.peer_tls_server_name)
