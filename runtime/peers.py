"""How a Tandem process names its host, names its peers, and calls them (TLS to other Tandem services).

A worker's identity is a DNS name derived from its registry record alone:

    peer_identity("decode-0", "gpu-node-7") == "decode-0.gpu-node-7.worker.tandem"

`tandemctl certs` writes it into the worker's certificate (a DNS SAN), and a
caller that dials the worker for a registry record sets the TLS target name
to the same string, so the handshake itself fails for a server whose
CA-signed certificate names another worker, another node, or none.
"""

from __future__ import annotations

import base64
import hashlib
import re
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc

IDENTITY_DOMAIN = "worker.tandem"
# The node label of a record that names no node: identity_label never yields it (kept labels have no "--",
# hashed ones start with "h--"), and the issuer refuses to put it in a certificate, so no server matches it.
NO_NODE_LABEL = "x--none"
# A name kept as it is: a lowercase DNS label without "--" (hashed labels carry "--", so the two never meet).
_PLAIN_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,46}[a-z0-9])?$")


def default_node_name() -> str:
    """The node name every process on a host uses unless told otherwise: the short host name.

    The agent registers the node and workers name it; cordons match on it, so
    both must agree.
    """
    return socket.gethostname().split(".")[0]


def identity_label(name: str) -> str:
    """One DNS label that stands for `name` and no other registry name. Pure.

    Lowercase names of a-z 0-9 and single hyphens (up to 48 characters) are
    kept. Any other name (upper case, '_', '.', ':', '--', long) becomes
    "h--" and 26 base32 characters of its SHA-256: DNS names match case-
    insensitively and have no room for '.' or ':' inside a label, so "Decode"
    and "decode" must not share a label.
    """
    if not name:
        raise ValueError("an identity needs a non-empty name")
    if _PLAIN_LABEL.match(name) and "--" not in name:
        return name
    digest = base64.b32encode(hashlib.sha256(name.encode()).digest()).decode().lower()
    return "h--" + digest[:26]


def peer_identity(worker_id: str, node: str) -> str:
    """The certificate name (DNS SAN) of worker `worker_id` on `node`: issuer and verifier both call this. Pure.

    A record without a node still gets a name, one no certificate carries: a forged record must not
    fall back to checking the address, which a stolen certificate of that host would pass."""
    return f"{identity_label(worker_id)}.{identity_label(node) if node else NO_NODE_LABEL}.{IDENTITY_DOMAIN}"


@dataclass(frozen=True)
class PeerTls:
    """TLS for calls between Tandem processes (router -> workers, decode -> prefill, prober -> workers).

    `verify_identity`: a call made for a registry record checks that the
    worker's certificate names that record's worker and node
    (`peer_identity`), instead of the address or `server_name`.
    """

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str = ""
    verify_identity: bool = False

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes(),
            private_key=self.key_file.read_bytes() if self.key_file else None,
            certificate_chain=self.cert_file.read_bytes() if self.cert_file else None,
        )

    def target_name(self, identity: str = "") -> str:
        """The name the peer's certificate must carry: its identity when verified, else server_name ('' = address)."""
        if self.verify_identity and identity:
            return identity
        return self.server_name

    def options(self, identity: str = "") -> tuple[tuple[str, str], ...]:
        name = self.target_name(identity)
        return (("grpc.ssl_target_name_override", name),) if name else ()
