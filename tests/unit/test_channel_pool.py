"""ChannelPool: one channel and one stub per endpoint, both forgotten when the endpoint is dropped."""

from __future__ import annotations

import asyncio

from runtime.channels import ChannelPool
from tandem.v1 import worker_pb2_grpc


def test_stubs_are_made_once_per_endpoint_and_renewed_after_a_drop() -> None:
    async def scenario() -> None:
        pool = ChannelPool()
        first = pool.stub(worker_pb2_grpc.DecodeStub, "127.0.0.1:9")
        assert pool.stub(worker_pb2_grpc.DecodeStub, "127.0.0.1:9") is first
        assert pool.stub(worker_pb2_grpc.DecodeStub, "127.0.0.1:10") is not first
        assert isinstance(pool.stub(worker_pb2_grpc.PrefillStub, "127.0.0.1:9"), worker_pb2_grpc.PrefillStub)
        pool.drop("127.0.0.1:9")  # the worker left: its channel closes, and a new call needs a new stub
        again = pool.stub(worker_pb2_grpc.DecodeStub, "127.0.0.1:9")
        assert again is not first
        assert pool.get("127.0.0.1:9") is not None
        await pool.close()

    asyncio.run(scenario())
