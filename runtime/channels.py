"""Client channels to other Tandem processes, one per endpoint, reused.

Routers call the same few workers thousands of times a second and decode
workers pull KV from the same prefill workers: a channel per endpoint keeps
HTTP/2 connections warm.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from runtime.peers import PeerTls

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


class ChannelPool:
    """Plaintext or TLS (`tls`) channels by endpoint. Use from one event loop; close() is safe twice."""

    def __init__(self, tls: PeerTls | None = None) -> None:
        self.tls = tls
        self._credentials = tls.credentials() if tls is not None else None
        self._options = [*CLIENT_OPTIONS, *(tls.options() if tls is not None else ())]
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, endpoint: str) -> grpc.aio.Channel:
        channel = self._channels.get(endpoint)
        if channel is None:
            if self._credentials is not None:
                channel = grpc.aio.secure_channel(endpoint, self._credentials, options=self._options)
            else:
                channel = grpc.aio.insecure_channel(endpoint, options=self._options)
            self._channels[endpoint] = channel
        return channel

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            with contextlib.suppress(Exception):
                await channel.close()
