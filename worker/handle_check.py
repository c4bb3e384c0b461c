"""Whether a decode worker may pull a KV handle: pure checks of plain values, before any connection.

    producer = check_handle(handle, HandlePolicy(model="m", transports=("grpc", "shm"), max_kv_bytes=4 << 30,
                                                 producers=view.records(Kind.WORKER)))

A handle arrives inside a client's Decode request, so every field is
untrusted. It is accepted only when

- its fields are well formed (a known transport, a tcp port in 1..65535 and
  an ASCII token, an nbytes within the cap): else `HandleMalformed`
  (INVALID_ARGUMENT) naming the field;
- it names a real producer: a registered worker of the same model that
  can prefill (its role, or one of its switchable roles: a worker switched
  away from prefill still serves the handles it exported), READY, DRAINING
  or SWITCHING (draining and switching workers serve their open handles), whose
  advertised endpoint is the handle's source_endpoint (and, for tcp, whose
  host is the tcp host); the transport is one this worker accepts; nbytes is
  what the layout implies for num_tokens: else `HandleRefused`
  (FAILED_PRECONDITION) naming the field.

So a forged handle can neither turn the decode worker into a relay to an
arbitrary host:port nor make it reserve memory. No grpc, no etcd, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from engine.base import InvalidRequest, KvMismatch
from engine.sim.tokens import kv_payload
from tandem.v1 import common_pb2, registry_pb2

# Element sizes of the KV dtypes the engines export (torch dtype names, the sim profiles' too).
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1}
# The sim engine's compact payload: a header and a uint32 per token (engine.sim.tokens).
_SIM_HEADER_BYTES = len(kv_payload(()))
_SERVING = (registry_pb2.WORKER_STATE_READY, registry_pb2.WORKER_STATE_DRAINING,
            registry_pb2.WORKER_STATE_SWITCHING)
MAX_TOKEN_CHARS = 256


class HandleMalformed(InvalidRequest):
    """A handle field is not well formed (INVALID_ARGUMENT); the message names the field."""


class HandleRefused(KvMismatch):
    """A well-formed handle this worker will not pull (FAILED_PRECONDITION); the message names the field."""


class UnknownProducer(HandleRefused):
    """No registered worker advertises the handle's source_endpoint (a caller may wait for its view to catch up)."""


@dataclass(frozen=True)
class HandlePolicy:
    """What a decode worker accepts: its model, its transports, its byte cap, and the registered workers."""

    model: str
    transports: Sequence[str]
    max_kv_bytes: int
    producers: Iterable[registry_pb2.WorkerRecord]
    # Every transport name that exists (engine.kv.transport.transport_names()): any other is malformed.
    known_transports: Sequence[str]


def layout_nbytes(layout: common_pb2.KvLayout, num_tokens: int) -> frozenset[int] | None:
    """The payload sizes `layout` allows for `num_tokens`; None when its dtype is not one we can size.

    Dense: K and V for every layer, layers x 2 x kv_heads x tokens x head_dim x dtype bytes
    (engine.torch_kv's format, and the sim engine's 'real' payload). The sim
    engine's 'tokens' payload (header + 4 bytes a token) is allowed too.
    """
    size = DTYPE_BYTES.get(layout.dtype)
    if size is None:
        return None
    dense = layout.num_layers * 2 * layout.num_kv_heads * num_tokens * layout.head_dim * size
    compact = _SIM_HEADER_BYTES + 4 * num_tokens
    return frozenset({dense, max(dense, compact), compact})


def check_handle(handle: common_pb2.KvHandle, policy: HandlePolicy) -> registry_pb2.WorkerRecord:
    """The producer's record when `handle` may be pulled; HandleMalformed / HandleRefused otherwise."""
    transport = handle.transport or "grpc"
    check_fields(handle, max_kv_bytes=policy.max_kv_bytes, known_transports=policy.known_transports)
    if transport not in policy.transports:
        raise HandleRefused(f"KV handle transport {transport!r} is not accepted by this worker (it accepts "
                            f"{', '.join(policy.transports)})")
    producer = _producer(handle, policy)
    if transport == "tcp":
        host = tcp_host(handle)
        if host not in (producer.host, _endpoint_host(producer.endpoint)):
            raise HandleRefused(f"KV handle transport_params.host {host!r} is not the host of producer "
                                f"{producer.worker_id!r} ({producer.host or _endpoint_host(producer.endpoint)!r})")
    allowed = layout_nbytes(handle.layout, handle.num_tokens)
    if allowed is not None and handle.nbytes not in allowed:
        raise HandleRefused(f"KV handle nbytes {handle.nbytes} is not what {handle.num_tokens} tokens of its layout "
                            f"take ({', '.join(str(n) for n in sorted(allowed))})")
    return producer


def handle_accepted(handle: common_pb2.KvHandle, policy: HandlePolicy) -> bool:
    """Whether check_handle accepts `handle` (for waiting on a registry view)."""
    try:
        check_handle(handle, policy)
    except (HandleMalformed, HandleRefused):
        return False
    return True


def check_fields(handle: common_pb2.KvHandle, *, max_kv_bytes: int, known_transports: Sequence[str]) -> None:
    """HandleMalformed naming the first field that is not well formed; nothing about who sent it."""
    transport = handle.transport or "grpc"
    if transport not in known_transports:
        raise HandleMalformed(f"KV handle transport {_show(transport)} is unknown; known: "
                              f"{', '.join(known_transports)}")
    if not handle.source_endpoint:
        raise HandleMalformed("KV handle source_endpoint is required")
    if handle.nbytes > max_kv_bytes:
        raise HandleMalformed(f"KV handle nbytes must be at most {max_kv_bytes} (max_kv_bytes), got {handle.nbytes}")
    if transport == "tcp":
        params = handle.transport_params
        port = params.get("port", "")
        if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            raise HandleMalformed(f"KV handle transport_params.port must be 1..65535, got {_show(port)}")
        token = params.get("token", "")
        if not token or not token.isascii() or not token.isprintable() or len(token) > MAX_TOKEN_CHARS:
            raise HandleMalformed(f"KV handle transport_params.token must be 1..{MAX_TOKEN_CHARS} printable ASCII "
                                  f"characters, got {_show(token)}")


def tcp_host(handle: common_pb2.KvHandle) -> str:
    """The host a tcp pull connects to (engine.kv.tcp_transport's rule)."""
    return (handle.transport_params.get("host") or _endpoint_host(handle.source_endpoint) or handle.source_host)


def _producer(handle: common_pb2.KvHandle, policy: HandlePolicy) -> registry_pb2.WorkerRecord:
    matches = [r for r in policy.producers if r.endpoint == handle.source_endpoint]
    if not matches:
        raise UnknownProducer(f"KV handle source_endpoint {_show(handle.source_endpoint)} is not a registered "
                              "worker")
    for record in matches:
        if common_pb2.ROLE_PREFILL not in (record.role, *record.switchable_roles):
            continue
        if record.model != policy.model:
            continue
        if record.state not in _SERVING:
            continue
        if handle.source_worker_id and record.worker_id != handle.source_worker_id:
            continue
        return record
    record = matches[0]
    raise HandleRefused(
        f"KV handle source_endpoint {_show(handle.source_endpoint)} is worker {record.worker_id!r} "
        f"({common_pb2.Role.Name(record.role)}, model {record.model!r}, "
        f"{registry_pb2.WorkerState.Name(record.state)}); the source_worker_id is {_show(handle.source_worker_id)}: "
        f"a KV handle must come from a READY, DRAINING or SWITCHING prefill-capable worker of model "
        f"{policy.model!r}")


def _endpoint_host(endpoint: str) -> str:
    return endpoint.rpartition(":")[0].strip("[]")


def _show(value: str) -> str:
    return repr(value if len(value) <= 80 else value[:80] + "...")
