"""The one module that talks to etcd: a small async client over etcd3aio.

Everything else in Tandem uses this wrapper, so the underlying library can
be swapped. It adds what the registry needs and etcd3aio does not give:

- every call has a deadline (a SIGSTOPped etcd must not hang a caller) and
  failures surface as one exception type, `EtcdUnavailable`;
- `watch()` never reconnects by itself: a broken or compacted watch raises,
  and the caller (registry.view) re-lists and diffs. Silent reconnects
  would resume from a revision that may no longer exist (etcd wiped) or skip
  compacted history;
- user/password auth re-authenticates when etcd forgets the token (restart);
- TLS with client certs and several endpoints of one cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
from etcd3aio import Etcd3Client, EtcdError, EtcdUnauthenticatedError
from etcd3aio._protobuf import (
    LeaseKeepAliveRequest,
    LeaseStub,
    WatchCreateRequest,
    WatchRequest,
    WatchStub,
)
from etcd3aio.auth import AuthService
from etcd3aio.kv import KVService, prefix_range_end
from etcd3aio.lease import LeaseService

log = logging.getLogger(__name__)
T = TypeVar("T")


class EtcdUnavailable(ConnectionError):
    """etcd did not answer in time or refused the call; the message names the endpoints."""


class WatchCompacted(Exception):
    """The watch's start revision was compacted away: re-list, then watch again."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"watch revision compacted (oldest available {compact_revision})")
        self.compact_revision = compact_revision


@dataclass(frozen=True)
class EtcdSettings:
    """How to reach etcd. `endpoints` are host:port of members of one cluster."""

    endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    # Certificate name to verify when the endpoints are IP addresses.
    tls_server_name: str = ""
    user: str = ""
    password: str = field(default="", repr=False)
    # Deadline of each call, seconds.
    timeout: float = 2.0

    @classmethod
    def parse(cls, endpoints: str, **kwargs: object) -> EtcdSettings:
        """From a comma-separated endpoint list ("http://" and "https://" schemes are accepted)."""
        parts = []
        for raw in endpoints.split(","):
            raw = raw.strip()
            for scheme in ("http://", "https://"):
                raw = raw.removeprefix(scheme)
            if raw:
                parts.append(raw.rstrip("/"))
        if not parts:
            raise ValueError("no etcd endpoint given (expected host:port[,host:port...])")
        return cls(endpoints=tuple(parts), **kwargs)  # type: ignore[arg-type]

    def describe(self) -> str:
        return ",".join(self.endpoints)


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int


class EventType(enum.Enum):
    PUT = 0
    DELETE = 1


@dataclass(frozen=True)
class WatchEvent:
    type: EventType
    kv: KeyValue


def _kv(raw: object) -> KeyValue:
    return KeyValue(
        key=raw.key.decode("utf-8", "replace"),  # type: ignore[attr-defined]
        value=bytes(raw.value),  # type: ignore[attr-defined]
        mod_revision=int(raw.mod_revision),  # type: ignore[attr-defined]
        create_revision=int(raw.create_revision),  # type: ignore[attr-defined]
        lease=int(raw.lease),  # type: ignore[attr-defined]
    )


class EtcdClient:
    """Async etcd client. `connect()` once; `close()` is safe to call twice."""

    def __init__(self, settings: EtcdSettings) -> None:
        self.settings = settings
        ca = settings.ca_file.read_bytes() if settings.ca_file else None
        self._client = Etcd3Client(
            list(settings.endpoints),
            rpc_max_attempts=2,
            tls_server_name=settings.tls_server_name or None,
            ca_cert=ca,
            cert_chain=settings.cert_file.read_bytes() if ca and settings.cert_file else None,
            cert_key=settings.key_file.read_bytes() if ca and settings.key_file else None,
        )
        # Subchannels of its own: gRPC otherwise shares connections to one address between channels, and a
        # fresh client to an etcd that just (re)started could inherit another channel's failed connection
        # and its reconnect backoff, failing fast with a stale "connection refused".
        self._client._manager.grpc_options.append(("grpc.use_local_subchannel_pool", 1))
        self._token = ""
        self._connected = False

    async def connect(self) -> EtcdClient:
        """Opens the channel (lazily connected: etcd may still be down)."""
        if not self._connected:
            await self._client.connect()
            self._connected = True
        return self

    async def close(self) -> None:
        if self._connected:
            self._connected = False
            await self._client.close()

    async def __aenter__(self) -> EtcdClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def _channel(self) -> grpc.aio.Channel:
        channel = self._client._channel  # the raw channel, for the streams etcd3aio hides
        if channel is None:
            raise EtcdUnavailable("etcd client is not connected")
        return channel

    def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        return (("token", self._token),) if self._token else None

    async def _authenticate(self) -> None:
        assert self._client.auth is not None
        reply = await self._client.auth.authenticate(
            self.settings.user, self.settings.password, timeout=self.settings.timeout
        )
        self._token = reply.token
        self._client.set_token(reply.token)

    async def _call(self, what: str, make: Callable[[], Awaitable[T]]) -> T:
        """Runs one etcd call with auth and a deadline; EtcdUnavailable on failure."""
        if not self._connected:
            await self.connect()
        for attempt in (1, 2):
            try:
                if self.settings.user and not self._token:
                    await self._authenticate()
                async with asyncio.timeout(self.settings.timeout * 2):
                    return await make()
            except EtcdUnauthenticatedError as exc:
                # etcd forgets tokens when it restarts: log in again, once.
                self._token = ""
                if not self.settings.user or attempt == 2:
                    raise EtcdUnavailable(f"etcd at {self.settings.describe()} refused {what}: {exc}") from exc
            except (EtcdError, grpc.aio.AioRpcError, TimeoutError, OSError) as exc:
                detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc) or type(exc).__name__
                raise EtcdUnavailable(f"etcd at {self.settings.describe()}: {what} failed: {detail}") from exc
        raise AssertionError("unreachable")

    # -- keys -----------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        reply = await self._call(f"get {key}", lambda: self._kv_api.get(key, timeout=self.settings.timeout))
        return _kv(reply.kvs[0]) if reply.kvs else None

    async def get_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        """All keys under `prefix` and the revision they were read at."""
        reply = await self._call(
            f"list {prefix}",
            lambda: self._kv_api.get(prefix, range_end=prefix_range_end(prefix), timeout=self.settings.timeout),
        )
        return int(reply.header.revision), [_kv(kv) for kv in reply.kvs]

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Writes `key`; returns the new revision."""
        reply = await self._call(f"put {key}", lambda: self._kv_api.put(key, value, lease=lease,
                                                                   timeout=self.settings.timeout))
        return int(reply.header.revision)

    async def delete(self, key: str) -> bool:
        """True when the key existed."""
        reply = await self._call(f"delete {key}", lambda: self._kv_api.delete(key, timeout=self.settings.timeout))
        return int(reply.deleted) > 0

    async def create_all(self, items: Sequence[tuple[str, bytes]], lease: int = 0) -> dict[str, KeyValue]:
        """Creates every key only if none exists, in one transaction.

        Returns {} on success; otherwise the existing keys that blocked it
        (nothing is written then).
        """
        compare = [KVService.txn_compare_create_revision(key, 0) for key, _ in items]
        success = [KVService.txn_op_put(key, value, lease=lease) for key, value in items]
        failure = [KVService.txn_op_get(key) for key, _ in items]
        reply = await self._call(
            f"create {', '.join(k for k, _ in items)}",
            lambda: self._kv_api.txn(compare, success, failure, timeout=self.settings.timeout),
        )
        if reply.succeeded:
            return {}
        existing = {}
        for response in reply.responses:
            for kv in response.response_range.kvs:
                entry = _kv(kv)
                existing[entry.key] = entry
        return existing

    async def put_all_if_created(self, guard_key: str, guard_create_revision: int,
                                 items: Sequence[tuple[str, bytes]]) -> bool:
        """Writes every item (no lease) in one transaction, only while `guard_key` still exists with
        `guard_create_revision`; False (nothing written) otherwise.

        The fence of etcd's concurrency.Election: a leader guards its writes with its own
        candidacy key, so a replica that lost leadership mid-decision writes nothing.
        """
        compare = [KVService.txn_compare_create_revision(guard_key, guard_create_revision)]
        success = [KVService.txn_op_put(key, value) for key, value in items]
        reply = await self._call(
            f"fenced put {', '.join(k for k, _ in items)}",
            lambda: self._kv_api.txn(compare, success, [], timeout=self.settings.timeout),
        )
        return bool(reply.succeeded)

    async def compact(self, revision: int) -> None:
        await self._call(f"compact {revision}", lambda: self._kv_api.compact(revision, timeout=self.settings.timeout))

    # -- leases ---------------------------------------------------------------

    async def grant(self, ttl: int) -> tuple[int, int]:
        """A new lease: (id, granted TTL in seconds)."""
        reply = await self._call("lease grant", lambda: self._lease_api.grant(ttl, timeout=self.settings.timeout))
        return int(reply.ID), int(reply.TTL)

    async def keepalive(self, lease_id: int) -> int:
        """Refreshes the lease once; returns its TTL, <= 0 when etcd no longer knows it."""

        async def once() -> int:
            async def requests() -> AsyncIterator[LeaseKeepAliveRequest]:
                yield LeaseKeepAliveRequest(ID=lease_id)

            call = LeaseStub(self._channel).LeaseKeepAlive(
                requests(), metadata=self._metadata(), timeout=self.settings.timeout
            )
            try:
                async for reply in call:
                    return int(reply.TTL)
                return 0
            finally:
                call.cancel()

        return await self._call(f"keepalive lease {lease_id:x}", once)

    async def revoke(self, lease_id: int, timeout: float | None = None) -> None:
        """Revokes the lease and deletes its keys. A lease etcd no longer knows is fine."""
        try:
            await self._call(
                f"revoke lease {lease_id:x}",
                lambda: self._lease_api.revoke(lease_id, timeout=timeout or self.settings.timeout),
            )
        except EtcdUnavailable as exc:
            if "not found" in str(exc):
                return
            raise

    async def leases(self) -> list[int]:
        reply = await self._call("list leases", lambda: self._lease_api.leases(timeout=self.settings.timeout))
        return [int(lease.ID) for lease in reply.leases]

    async def lease_info(self, lease_id: int) -> tuple[int, int, list[str]]:
        """(granted TTL, remaining TTL, keys) of a lease; remaining -1 when expired."""
        reply = await self._call(
            f"lease {lease_id:x} ttl",
            lambda: self._lease_api.time_to_live(lease_id, keys=True, timeout=self.settings.timeout),
        )
        return int(reply.grantedTTL), int(reply.TTL), [k.decode("utf-8", "replace") for k in reply.keys]

    # -- cluster --------------------------------------------------------------

    async def status(self) -> tuple[int, int]:
        """(cluster id, current revision) of the member answering."""
        reply = await self._call(
            "status", lambda: self._client.maintenance.status(timeout=self.settings.timeout)  # type: ignore[union-attr]
        )
        return int(reply.header.cluster_id), int(reply.header.revision)

    # -- watch ----------------------------------------------------------------

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """Batches of events under `prefix` from `start_revision` on.

        Never reconnects: raises WatchCompacted when the start revision is
        gone and EtcdUnavailable when the stream breaks. The caller re-lists.
        """
        if not self._connected:
            await self.connect()
        if self.settings.user and not self._token:
            await self._call("authenticate", self._authenticate)
        create = WatchCreateRequest(
            key=prefix.encode(), range_end=prefix_range_end(prefix), start_revision=start_revision,
        )
        stop = asyncio.Event()

        async def requests() -> AsyncIterator[WatchRequest]:
            yield WatchRequest(create_request=create)
            await stop.wait()

        call = WatchStub(self._channel).Watch(requests(), metadata=self._metadata())
        try:
            async for reply in call:
                if reply.compact_revision:
                    raise WatchCompacted(int(reply.compact_revision))
                if reply.canceled:
                    raise EtcdUnavailable(f"etcd cancelled the watch on {prefix}: {reply.cancel_reason}")
                if reply.events:
                    batch = [
                        WatchEvent(EventType.DELETE if event.type == 1 else EventType.PUT, _kv(event.kv))
                        for event in reply.events
                    ]
                    # Hold neither while waiting for the next reply: a mass deletion (a revoked lease of
                    # 10,000 keys) is one reply, and would otherwise stay in memory until etcd next speaks.
                    del reply
                    yield batch
                    del batch
            raise EtcdUnavailable(f"etcd at {self.settings.describe()} ended the watch on {prefix}")
        except grpc.aio.AioRpcError as exc:
            raise EtcdUnavailable(f"watch on {prefix} broke: {exc.code().name} {exc.details()}") from exc
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                call.cancel()

    @property
    def auth_api(self) -> AuthService:
        """etcd's Auth API on this connection (users, roles, enabling auth); for provisioning only."""
        assert self._client.auth is not None, "connect() first"
        return self._client.auth

    @property
    def _kv_api(self) -> KVService:
        assert self._client.kv is not None, "connect() first"
        return self._client.kv

    @property
    def _lease_api(self) -> LeaseService:
        assert self._client.lease is not None, "connect() first"
        return self._client.lease
