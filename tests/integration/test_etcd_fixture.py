"""The etcd fixture is a real etcd: data round-trips and leases expire."""

from __future__ import annotations

import asyncio
import time

import pytest
from etcd3aio import Etcd3Client

from controlplane.etcd_server import EtcdServer, start_cluster

pytestmark = pytest.mark.integration


async def test_put_get_roundtrip(etcd: EtcdServer) -> None:
    async with Etcd3Client([etcd.endpoint]) as client:
        assert client.kv is not None
        await client.kv.put("/tandem/test/key", "value-1")
        reply = await client.kv.get("/tandem/test/key")
        assert [kv.value for kv in reply.kvs] == [b"value-1"]


async def test_lease_expiry_removes_key(etcd: EtcdServer) -> None:
    async with Etcd3Client([etcd.endpoint]) as client:
        assert client.kv is not None and client.lease is not None
        lease = await client.lease.grant(ttl=2)
        await client.kv.put("/tandem/test/leased", "x", lease=lease.ID)
        assert (await client.kv.get("/tandem/test/leased")).count == 1
        started = time.monotonic()
        # Poll with a deadline: etcd expires leases on its own schedule
        # (TTL plus up to one leader tick of slack).
        while (await client.kv.get("/tandem/test/leased")).count:
            assert time.monotonic() - started < 10, "leased key outlived its 2 s TTL by far"
            await asyncio.sleep(0.1)
        assert time.monotonic() - started >= 1.0, "key vanished before its lease could expire"


def test_restart_keeps_data_and_wipe_clears_it(etcd: EtcdServer) -> None:
    async def put() -> None:
        async with Etcd3Client([etcd.endpoint]) as client:
            assert client.kv is not None
            await client.kv.put("/tandem/test/persist", "kept")

    async def count() -> int:
        async with Etcd3Client([etcd.endpoint]) as client:
            assert client.kv is not None
            return int((await client.kv.get("/tandem/test/persist")).count)

    asyncio.run(put())
    first_pid = etcd.pid
    etcd.kill()
    etcd.start()
    assert etcd.pid != first_pid
    assert asyncio.run(count()) == 1
    etcd.stop()
    etcd.wipe()
    etcd.start()
    assert asyncio.run(count()) == 0


def test_three_member_cluster_serves_with_one_member_down(tmp_path) -> None:  # type: ignore[no-untyped-def]
    members = start_cluster(3, tmp_path / "cluster")
    try:
        endpoints = [m.endpoint for m in members]

        async def write_and_read(key: str) -> bytes:
            async with Etcd3Client(endpoints) as client:
                assert client.kv is not None
                await client.kv.put(key, key)
                return bytes((await client.kv.get(key)).kvs[0].value)

        assert asyncio.run(write_and_read("/tandem/test/a")) == b"/tandem/test/a"
        members[0].kill()
        assert asyncio.run(write_and_read("/tandem/test/b")) == b"/tandem/test/b"
    finally:
        for member in members:
            member.close()
