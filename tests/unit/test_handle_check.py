"""worker.handle_check with plain values: which KV handles a decode worker pulls, and the status of each refusal."""

from __future__ import annotations

import pytest

from engine.base import InvalidRequest, KvMismatch
from engine.kv.transport import transport_names
from tandem.v1 import common_pb2, registry_pb2
from worker.handle_check import (
    HandleMalformed,
    HandlePolicy,
    HandleRefused,
    UnknownProducer,
    check_handle,
    handle_accepted,
    layout_nbytes,
)

LAYOUT = common_pb2.KvLayout(model_fingerprint="fp", num_layers=2, num_kv_heads=4, head_dim=8, dtype="float32")
DENSE_3 = 2 * 2 * 4 * 3 * 8 * 4  # layers x K,V x heads x tokens x head_dim x float32
PRODUCER = registry_pb2.WorkerRecord(worker_id="p1", role=common_pb2.ROLE_PREFILL, model="m",
                                     endpoint="10.0.0.5:7000", host="10.0.0.5",
                                     state=registry_pb2.WORKER_STATE_READY)


def policy(*records: registry_pb2.WorkerRecord, transports: tuple[str, ...] = ("grpc", "shm", "tcp"),
           max_kv_bytes: int = 1 << 30) -> HandlePolicy:
    return HandlePolicy(model="m", transports=transports, max_kv_bytes=max_kv_bytes,
                        producers=records or (PRODUCER,), known_transports=transport_names())


def handle(**fields: object) -> common_pb2.KvHandle:
    base: dict[str, object] = dict(handle_id="h", source_worker_id="p1", source_endpoint="10.0.0.5:7000",
                                   transport="grpc", layout=LAYOUT, num_tokens=3, nbytes=DENSE_3)
    base.update(fields)
    return common_pb2.KvHandle(**base)  # type: ignore[arg-type]


def tcp(port: str = "9000", token: str = "ab" * 16, **params: str) -> common_pb2.KvHandle:
    return handle(transport="tcp", transport_params={"port": port, "token": token, **params})


def test_a_real_producers_handle_is_accepted() -> None:
    assert check_handle(handle(), policy()) == PRODUCER
    assert check_handle(tcp(), policy()).worker_id == "p1"
    draining = registry_pb2.WorkerRecord()
    draining.CopyFrom(PRODUCER)
    draining.state = registry_pb2.WORKER_STATE_DRAINING
    assert check_handle(handle(), policy(draining)).worker_id == "p1"
    assert handle_accepted(handle(), policy())


def test_the_sim_engines_compact_payload_is_accepted() -> None:
    assert 12 + 4 * 3 in (layout_nbytes(LAYOUT, 3) or ())
    assert check_handle(handle(nbytes=12 + 4 * 3), policy())


@pytest.mark.parametrize(("bad", "field"), [
    (handle(transport="carrier-pigeon"), "transport"),
    (handle(nbytes=1 << 50), "nbytes"),
    (handle(nbytes=(1 << 64) - 1), "nbytes"),
    (handle(source_endpoint=""), "source_endpoint"),
    (tcp(port="99999"), "port"),
    (tcp(port="-1"), "port"),
    (tcp(port="0"), "port"),
    (tcp(port="x"), "port"),
    (tcp(port="٣"), "port"),  # a Unicode digit int() would take
    (tcp(token="tökén"), "token"),
    (tcp(token=""), "token"),
    (tcp(token="a\nb"), "token"),
])
def test_malformed_fields_are_invalid_argument(bad: common_pb2.KvHandle, field: str) -> None:
    with pytest.raises(HandleMalformed, match=field) as info:
        check_handle(bad, policy())
    assert isinstance(info.value, InvalidRequest)


def _record(**changes: object) -> registry_pb2.WorkerRecord:
    record = registry_pb2.WorkerRecord()
    record.CopyFrom(PRODUCER)
    for name, value in changes.items():
        setattr(record, name, value)
    return record


@pytest.mark.parametrize(("bad", "records", "transports", "field"), [
    (handle(source_endpoint="10.0.0.9:7000"), (PRODUCER,), ("grpc",), "source_endpoint"),
    (handle(), (_record(role=common_pb2.ROLE_DECODE),), ("grpc",), "source_endpoint"),
    (handle(), (_record(model="other"),), ("grpc",), "source_endpoint"),
    (handle(), (_record(state=registry_pb2.WORKER_STATE_STARTING),), ("grpc",), "source_endpoint"),
    (handle(source_worker_id="p2"), (PRODUCER,), ("grpc",), "source_endpoint"),
    (tcp(), (PRODUCER,), ("grpc", "shm"), "transport"),
    (tcp(host="127.0.0.1"), (PRODUCER,), ("grpc", "tcp"), "transport_params.host"),
    (handle(nbytes=DENSE_3 + 1), (PRODUCER,), ("grpc",), "nbytes"),
    (handle(num_tokens=4), (PRODUCER,), ("grpc",), "nbytes"),
])
def test_unacceptable_handles_are_failed_precondition(bad: common_pb2.KvHandle,
                                                       records: tuple[registry_pb2.WorkerRecord, ...],
                                                       transports: tuple[str, ...], field: str) -> None:
    with pytest.raises(HandleRefused, match=field) as info:
        check_handle(bad, policy(*records, transports=transports))
    assert isinstance(info.value, KvMismatch)
    assert not handle_accepted(bad, policy(*records, transports=transports))


def test_an_unregistered_source_is_an_unknown_producer() -> None:
    with pytest.raises(UnknownProducer):
        check_handle(handle(source_endpoint="evil:25"), policy())


def test_the_cap_applies_even_when_the_layout_cannot_size_the_payload() -> None:
    odd = common_pb2.KvLayout(model_fingerprint="fp", dtype="vllm-paged")
    assert layout_nbytes(odd, 3) is None
    assert check_handle(handle(layout=odd, nbytes=123), policy())
    with pytest.raises(HandleMalformed, match="nbytes"):
        check_handle(handle(layout=odd, nbytes=2 << 30), policy())
