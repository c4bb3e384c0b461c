"""Forged KV handles against a real decode worker: no relay, no memory pinned, a defined status per bad field.

A real etcd, a real sim prefill worker and a real sim decode worker (which
accepts grpc and tcp, not shm). Each forged handle is a real handle with one
field changed. The decode worker must refuse it before connecting anywhere
(a listening socket of ours, named by the forged handles, accepts nothing),
without reserving the named nbytes (its peak RSS stays put), with
INVALID_ARGUMENT or FAILED_PRECONDITION naming the field, and afterwards
still serve a real disaggregated request.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from controlplane.supervisor import health_status
from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.faults.conftest import MODEL, SIM, Fleet

pytestmark = [pytest.mark.integration, pytest.mark.fault]

INVALID = grpc.StatusCode.INVALID_ARGUMENT
REFUSED = grpc.StatusCode.FAILED_PRECONDITION
PROMPT = list(range(10, 60))
SAMPLING = common_pb2.SamplingParams(max_tokens=4, ignore_eos=True)


def peak_rss_bytes(pid: int) -> int:
    """VmHWM: the most resident memory the process ever held (an upfront allocation would raise it)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def forged(real: common_pb2.KvHandle, change: Callable[[common_pb2.KvHandle], None]) -> common_pb2.KvHandle:
    handle = common_pb2.KvHandle()
    handle.CopyFrom(real)
    change(handle)
    return handle


def tcp_to(port: int, token: str = "ab" * 16, host: str = "") -> Callable[[common_pb2.KvHandle], None]:
    def change(handle: common_pb2.KvHandle) -> None:
        handle.transport = "tcp"
        handle.transport_params.clear()
        handle.transport_params.update(port=str(port), token=token)
        if host:
            handle.transport_params["host"] = host
    return change


def setter(**fields: object) -> Callable[[common_pb2.KvHandle], None]:
    def change(handle: common_pb2.KvHandle) -> None:
        for name, value in fields.items():
            setattr(handle, name, value)
    return change


async def decode(stub: worker_pb2_grpc.DecodeStub, handle: common_pb2.KvHandle, first: int) -> list[int]:
    tokens: list[int] = []
    async for step in stub.Decode(worker_pb2.DecodeRequest(model=MODEL, prompt_token_ids=PROMPT, sampling=SAMPLING,
                                                           handle=handle, first_token_id=first), timeout=30):
        tokens.extend(step.token_ids)
    return tokens


async def test_forged_handles_are_refused_before_any_connection(fleet: Fleet) -> None:
    prefill = fleet.start("p", "prefill_svc", *SIM, "--speedup", "1000", "--kv-transports", "grpc,shm,tcp")
    dec = fleet.start("d", "decode_svc", *SIM, "--speedup", "1000", "--kv-transports", "grpc,tcp")
    trap = socket.create_server(("127.0.0.1", 0))
    trap.setblocking(False)
    trap_port = trap.getsockname()[1]
    async with grpc.aio.insecure_channel(prefill.endpoint) as p_channel, \
            grpc.aio.insecure_channel(dec.endpoint) as d_channel:
        p_stub, d_stub = worker_pb2_grpc.PrefillStub(p_channel), worker_pb2_grpc.DecodeStub(d_channel)
        reply = await p_stub.Prefill(worker_pb2.PrefillRequest(model=MODEL, prompt_token_ids=PROMPT,
                                                               sampling=SAMPLING, kv_transports=["grpc"]), timeout=30)
        real = reply.handle
        assert real.transport == "grpc" and real.nbytes > 0
        trap_endpoint = f"127.0.0.1:{trap_port}"
        cases: list[tuple[str, Callable[[common_pb2.KvHandle], None], grpc.StatusCode, str]] = [
            # The relay: tcp to our socket, from an unknown source or with another host than the producer's.
            ("relay, unknown source", lambda h: (setter(source_endpoint=trap_endpoint)(h), tcp_to(trap_port)(h)),
             REFUSED, "source_endpoint"),
            ("relay, real source", tcp_to(trap_port, host="localhost"), REFUSED, "transport_params.host"),
            ("grpc pull from our socket", setter(source_endpoint=trap_endpoint), REFUSED, "source_endpoint"),
            ("transport not accepted", setter(transport="shm"), REFUSED, "transport"),
            ("unknown transport", setter(transport="carrier-pigeon"), INVALID, "transport"),
            ("nbytes 2^50", setter(nbytes=1 << 50), INVALID, "nbytes"),
            ("nbytes 2^63", setter(nbytes=1 << 63), INVALID, "nbytes"),
            ("nbytes 3 GiB (under the cap)", setter(nbytes=3 << 30), REFUSED, "nbytes"),
            ("nbytes off by one", setter(nbytes=real.nbytes + 1), REFUSED, "nbytes"),
            ("tcp port 99999", tcp_to(99999), INVALID, "port"),
            ("tcp port -1", lambda h: (tcp_to(trap_port)(h), h.transport_params.update(port="-1")), INVALID, "port"),
            ("non-ASCII tcp token", tcp_to(trap_port, token="tökén" * 6), INVALID, "token"),
            ("another producer id", setter(source_worker_id="someone-else"), REFUSED, "source_endpoint"),
        ]
        peak_before = peak_rss_bytes(dec.pid)
        for name, change, code, field in cases:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await decode(d_stub, forged(real, change), reply.first_token_id)
            assert info.value.code() == code, f"{name}: {info.value.code().name} {info.value.details()}"
            assert field in (info.value.details() or ""), f"{name}: {info.value.details()}"
        peak_after = peak_rss_bytes(dec.pid)
        with pytest.raises(BlockingIOError):
            trap.accept()  # nobody connected to our socket: the worker relayed nothing
        trap.close()
        # 3 GiB (and 2^50, 2^63) were named; well under one of them was ever held.
        assert peak_after - peak_before < 256 << 20, (peak_before, peak_after)
        assert health_status(dec.endpoint) == "SERVING"
        # The real handle still works: the refusals took no slot and released nothing.
        tokens = await decode(d_stub, real, reply.first_token_id)
        assert len(tokens) == SAMPLING.max_tokens - 1
