"""tandemctl's connection to the Admin API, and its error messages.

Every failure a user can meet reaches them as `CliError`: one line that names
the endpoint and what to check, and an exit status (see EXIT_*). `explain()`
is the pure mapping from a gRPC status to that line, unit-tested with plain
values.
"""

from __future__ import annotations

import getpass
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from tandem.v1 import admin_pb2_grpc

EXIT_OK = 0
EXIT_ERROR = 1  # the control plane refused or failed the request
EXIT_USAGE = 2  # bad flags or values (typer/click use 2 as well)
EXIT_UNREACHABLE = 3  # no answer from the control plane
EXIT_AUTH = 4  # missing or rejected admin token
EXIT_NOT_FOUND = 5  # the worker, node or model named does not exist

DEFAULT_ENDPOINT = "127.0.0.1:7070"


class CliError(Exception):
    """An expected failure: `str(error)` is the one line for stderr, `exit_code` the status."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Connection:
    """How to reach the Admin API. TLS is on when any of the three files is given."""

    endpoint: str = DEFAULT_ENDPOINT
    token: str = field(default="", repr=False)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    timeout: float = 10.0

    @property
    def tls(self) -> bool:
        return any((self.ca_file, self.cert_file, self.key_file))


def _short(details: str) -> str:
    """The useful end of a gRPC connection error ("connection refused")."""
    text = (details or "").strip()
    if "resolv" in text.lower() and "not found" in text.lower():
        return "host name not found"
    if ("failed to connect" in text.lower() or "dns resolution failed" in text.lower()) and ": " in text:
        text = text.rsplit(": ", 1)[1]
    return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text


# What gRPC says when one side speaks TLS and the other does not, or the certificates do not match:
# "Socket closed" (a plaintext client at a TLS server), "Ssl handshake failed", "CERTIFICATE_VERIFY_FAILED".
_TLS_SIGNS = ("socket closed", "handshake", "ssl", "tls", "certificate")


def looks_like_tls(details: str) -> bool:
    """Whether an UNAVAILABLE detail points at a TLS mismatch rather than nobody listening. Pure."""
    text = details.lower()
    return any(sign in text for sign in _TLS_SIGNS)


def tls_advice(tls: bool, ca_flag: str = "--ca-file", client_flags: str = "--cert-file and --key-file") -> str:
    """What to try when a TLS mismatch is the likely cause, given whether this call used TLS. Pure."""
    if not tls:
        return (f"TLS is the likely cause: it probably serves TLS; pass {ca_flag} "
                f"(and {client_flags} if it wants a client certificate).")
    return (f"TLS is the likely cause: check that {ca_flag} holds the CA that signed its certificate, "
            f"pass {client_flags} if it wants a client certificate, or drop the TLS flags if it serves plaintext.")


def explain(code: grpc.StatusCode, details: str, endpoint: str, *, token_given: bool, timeout: float,
            method: str, tls: bool = False) -> tuple[str, int]:
    """(one line for stderr, exit status) for a failed Admin call (made over TLS when `tls`). Pure."""
    where = f"the control plane at {endpoint}"
    if code is grpc.StatusCode.UNAVAILABLE and details.lower().startswith("etcd"):
        # The control plane answered; it is its registry that is away.
        return (f"tandemctl: {where} answered, but cannot use etcd ({details}). "
                "Check etcd and the control plane's --etcd setting."), EXIT_UNREACHABLE
    if code is grpc.StatusCode.UNAVAILABLE and looks_like_tls(details):
        return (f"tandemctl: cannot reach {where} (UNAVAILABLE: {_short(details)}). {tls_advice(tls)}"), \
            EXIT_UNREACHABLE
    if code is grpc.StatusCode.UNAVAILABLE:
        return (f"tandemctl: cannot reach {where} (UNAVAILABLE: {_short(details)}). "
                "Is tandem-controlplane running there? Set --endpoint or TANDEM_ENDPOINT."), EXIT_UNREACHABLE
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return (f"tandemctl: {where} did not answer within {timeout:g}s (DEADLINE_EXCEEDED). "
                "Is it overloaded, or is its etcd down? Check its logs or raise --timeout."), EXIT_UNREACHABLE
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        if token_given:
            return (f"tandemctl: {where} rejected the admin token ({code.name}: {details}). "
                    "Check --token or TANDEM_ADMIN_TOKEN."), EXIT_AUTH
        return (f"tandemctl: {where} needs an admin token for {method}: "
                "pass --token or set TANDEM_ADMIN_TOKEN."), EXIT_AUTH
    if code is grpc.StatusCode.NOT_FOUND:
        return f"tandemctl: {details}", EXIT_NOT_FOUND
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.OUT_OF_RANGE):
        return f"tandemctl: {details}", EXIT_ERROR
    if code is grpc.StatusCode.UNIMPLEMENTED:
        return (f"tandemctl: {where} does not offer {method} (UNIMPLEMENTED). "
                "Is it an older version than this tandemctl, or is another service listening there?"), EXIT_ERROR
    return f"tandemctl: {method} at {endpoint} failed ({code.name}: {details})", EXIT_ERROR


def operator() -> str:
    """Who is asking ("alice@host"), sent as metadata for the intents' `requested_by`."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


class AdminClient:
    """A blocking Admin API client for one command. `close()` is safe to call twice."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._channel: grpc.Channel | None = None

    def _open(self) -> grpc.Channel:
        if self._channel is not None:
            return self._channel
        conn = self.connection
        if not conn.tls:
            self._channel = grpc.insecure_channel(conn.endpoint)
            return self._channel
        root, chain, key = tls_files(conn.ca_file, conn.cert_file, conn.key_file)
        self._channel = grpc.secure_channel(conn.endpoint, grpc.ssl_channel_credentials(
            root_certificates=root, private_key=key, certificate_chain=chain))
        return self._channel

    def call(self, method: str, request: Message) -> Any:
        """Admin.`method`(request) with the deadline and token; CliError for every RPC failure."""
        conn = self.connection
        metadata = [("tandem-requested-by", operator())]
        if conn.token:
            metadata.append(("authorization", f"Bearer {conn.token}"))
        stub = admin_pb2_grpc.AdminStub(self._open())
        try:
            return getattr(stub, method)(request, timeout=conn.timeout, metadata=metadata)
        except grpc.RpcError as exc:
            message, status = explain(exc.code(), exc.details() or "", conn.endpoint,
                                      token_given=bool(conn.token), timeout=conn.timeout, method=method,
                                      tls=conn.tls)
            raise CliError(message, status) from None

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


def tls_files(ca_file: Path | None, cert_file: Path | None,
              key_file: Path | None) -> tuple[bytes | None, bytes | None, bytes | None]:
    """(CA bundle, client certificate, key) as PEM bytes; CliError (usage) for a lone cert or key, or a bad file."""
    if bool(cert_file) != bool(key_file):
        raise CliError("tandemctl: --cert-file and --key-file go together (client certificate and its key)",
                       EXIT_USAGE)
    return _read(ca_file, "--ca-file"), _read(cert_file, "--cert-file"), _read(key_file, "--key-file")


def _read(path: Path | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CliError(f"tandemctl: cannot read {flag} {path}: {exc.strerror}", EXIT_USAGE) from None
