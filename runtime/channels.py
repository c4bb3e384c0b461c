"""Client channels to other Tandem processes, one per endpoint (and peer identity), reused.

Routers call the same few workers thousands of times a second and decode
workers pull KV from the same prefill workers: a channel per endpoint keeps
HTTP/2 connections warm.

With identity checks on (`PeerTls.verify_identity`), a channel opened for a
registry record verifies the name `runtime.peers.peer_identity` derives from
that record, so a server with no CA-signed certificate, or one that names
another worker, fails the handshake: no request reaches it. Those failures
are counted (`tandem_peer_identity_failures`) and logged once per endpoint
and identity, not once per attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from prometheus_client import Counter

if TYPE_CHECKING:
    from runtime.peers import PeerTls

S = TypeVar("S")

log = logging.getLogger(__name__)

CLIENT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect fast after a worker restarts on the same address.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)

PEER_IDENTITY_FAILURES = Counter(
    "tandem_peer_identity_failures",
    "Calls to a peer that failed the TLS handshake (no CA-signed certificate, or one naming another worker)")

# How long calls still running on a dropped channel may take to finish.
DROP_GRACE_S = 300.0

# Channel closes in flight (a task is kept referenced until it ends).
_CLOSING: set[asyncio.Task[None]] = set()

# What grpc's details say when the TLS handshake or the peer's certificate name failed.
_HANDSHAKE_SIGNS = ("handshake", "ssl", "certificate", "peer name", "tls", "hostname verification")


def is_handshake_failure(details: str) -> bool:
    """Whether a failed call's details say the TLS handshake failed. Pure."""
    lowered = (details or "").lower()
    return any(sign in lowered for sign in _HANDSHAKE_SIGNS)


class ChannelPool:
    """Plaintext or TLS (`tls`) channels by endpoint. Use from one event loop; close() is safe twice."""

    def __init__(self, tls: PeerTls | None = None) -> None:
        self.tls = tls
        self._credentials = tls.credentials() if tls is not None else None
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}
        # Stubs by (stub class, endpoint, verified name): a stub builds a callable per method, and a router
        # makes a call or two per request.
        self._stubs: dict[tuple[Callable[[grpc.aio.Channel], Any], str, str], Any] = {}
        self._reported: set[tuple[str, str]] = set()

    def _target(self, endpoint: str, identity: str) -> str:
        """The name a channel to `endpoint` verifies for `identity` ('' : the address or the shared name)."""
        if self.tls is None or not self.tls.verify_identity:
            return ""
        if identity:
            return identity
        # A call that names no record (a KV handle release) reuses the verified channel of that endpoint.
        return next((name for ep, name in self._channels if ep == endpoint and name), "")

    def get(self, endpoint: str, identity: str = "") -> grpc.aio.Channel:
        """The channel to `endpoint`; `identity` (runtime.peers.peer_identity of the record dialed for) is
        what its certificate must name when identity checks are on, and ignored otherwise."""
        key = (endpoint, self._target(endpoint, identity))
        channel = self._channels.get(key)
        if channel is None:
            if self._credentials is not None:
                assert self.tls is not None
                options = [*CLIENT_OPTIONS, *self.tls.options(key[1])]
                channel = grpc.aio.secure_channel(endpoint, self._credentials, options=options)
            else:
                channel = grpc.aio.insecure_channel(endpoint, options=CLIENT_OPTIONS)
            self._channels[key] = channel
        return channel

    def stub(self, stub_class: Callable[[grpc.aio.Channel], S], endpoint: str, identity: str = "") -> S:
        """A `stub_class` (a generated *Stub) on the channel `get(endpoint, identity)` returns, made once."""
        key = (stub_class, endpoint, self._target(endpoint, identity))
        found = self._stubs.get(key)
        if found is None:  # drop() and close() forget the stubs with their channels
            found = self._stubs[key] = stub_class(self.get(endpoint, identity))
        return found

    def note_failure(self, endpoint: str, identity: str, details: str) -> bool:
        """Counts a call that failed the TLS handshake (and logs it once per endpoint and identity).

        Returns whether it was one. Callers pass every UNAVAILABLE they see from a peer."""
        if self.tls is None or not is_handshake_failure(details):
            return False
        PEER_IDENTITY_FAILURES.inc()
        key = (endpoint, self._target(endpoint, identity))
        if key not in self._reported:
            self._reported.add(key)
            log.warning("peer failed the TLS handshake: its certificate is not CA-signed or does not name it",
                        extra={"endpoint": endpoint, "expected_name": key[1] or endpoint, "details": details})
        return True

    def drop(self, endpoint: str) -> None:
        """Closes the channels to `endpoint` (its workers left): a pool that only grew would keep a
        connection, or reconnect attempts, to every address ever registered. Calls still running on one
        (a draining worker finishing its streams) get `DROP_GRACE_S` to end; a new call opens a new
        channel."""
        for stub_key in [key for key in self._stubs if key[1] == endpoint]:
            del self._stubs[stub_key]
        for key in [key for key in self._channels if key[0] == endpoint]:
            channel = self._channels.pop(key)
            self._reported.discard(key)
            task = asyncio.get_running_loop().create_task(channel.close(grace=DROP_GRACE_S))
            _CLOSING.add(task)
            task.add_done_callback(_CLOSING.discard)

    async def close(self) -> None:
        self._stubs.clear()
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            with contextlib.suppress(Exception):
                await channel.close()
