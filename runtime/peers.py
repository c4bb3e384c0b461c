"""How a Tandem process names its host and calls its peers (TLS to other Tandem services)."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import grpc


def default_node_name() -> str:
    """The node name every process on a host uses unless told otherwise: the short host name.

    The agent registers the node and workers name it; cordons match on it, so
    both must agree.
    """
    return socket.gethostname().split(".")[0]


@dataclass(frozen=True)
class PeerTls:
    """TLS for calls between Tandem processes (router -> workers, decode -> prefill, prober -> workers)."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str = ""

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes(),
            private_key=self.key_file.read_bytes() if self.key_file else None,
            certificate_chain=self.cert_file.read_bytes() if self.cert_file else None,
        )

    def options(self) -> tuple[tuple[str, str], ...]:
        return (("grpc.ssl_target_name_override", self.server_name),) if self.server_name else ()
