"""Every public and admin RPC under random and malformed requests: no crash, only defined statuses.

Targets (real processes): the router (Inference), a prefill worker (Prefill,
KvSource, Worker), a decode worker (Decode, Worker) and a control-plane
replica (Admin). Two kinds of input per method:

- schema fuzzing: messages drawn from the request type's descriptor
  (tests/faults/proto_fuzz.py). The answer must be OK or one of the statuses
  docs/api.md defines; never INTERNAL, UNKNOWN, a hang or a dead process.
- wire fuzzing: raw bytes through a generic call (no serializer). Bytes that
  do not parse as the request type are refused by grpc itself before any
  servicer runs, with UNKNOWN "Unexpected <class '...DecodeError'>" (what
  grpc.aio answers for a request it cannot deserialize); that exact answer is
  accepted for them. Bytes that do parse are held to the schema rule.

After each method's examples the target must be alive, report
grpc.health.v1 SERVING, and serve a normal request.

The control plane uses its own etcd prefix, so that fuzzed drains, cordons
and model specs cannot change what the router serves.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.supervisor import ManagedProcess, health_status
from tandem.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from tests.faults.conftest import SIM, Fleet
from tests.faults.proto_fuzz import decodes, messages, mutations, raw_payloads

pytestmark = [pytest.mark.fault, pytest.mark.integration]

DEFINED = frozenset({
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNAUTHENTICATED,
})
UNDECODABLE = "Unexpected <class 'google.protobuf.message.DecodeError'>"
ADMIN_TOKEN = "fuzz-token"
CALL_TIMEOUT = 30.0
SCHEMA_EXAMPLES = 30
WIRE_EXAMPLES = 15

SERVICES = {
    "router": [inference_pb2.DESCRIPTOR.services_by_name["Inference"]],
    "p0": [worker_pb2.DESCRIPTOR.services_by_name[n] for n in ("Prefill", "KvSource", "Worker")],
    "d0": [worker_pb2.DESCRIPTOR.services_by_name[n] for n in ("Decode", "Worker")],
    "cp": [admin_pb2.DESCRIPTOR.services_by_name["Admin"]],
}
TARGETS = [(process, method.full_name) for process, services in SERVICES.items()
           for service in services for method in service.methods]


# (request type, payload, status, details, whether an admin token was sent) -> raises if not acceptable
Check = Callable[[type[Message], bytes, grpc.StatusCode, str, bool], None]


@dataclass(frozen=True)
class Target:
    process: ManagedProcess
    method: MethodDescriptor

    @property
    def path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def request_type(self) -> type[Message]:
        return message_factory.GetMessageClass(self.method.input_type)


@pytest.fixture(scope="module")
def fuzz_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(Path(tmp_path_factory.mktemp("fuzz")))
    try:
        sim = (*SIM, "--speedup", "1000")
        fleet.start("p0", "prefill_svc", *sim, "--kv-handle-ttl", "5")
        fleet.start("d0", "decode_svc", *sim)
        fleet.start("router", "router_svc", "--local-prefill-max-prompt-tokens", "8", "--max-output-tokens", "64",
                    "--capacity-wait-s", "1")
        fleet.start("cp", "controlplane.server", "--replica-id", "cp", "--etcd-prefix", "/fuzz-admin",
                    "--admin-token", ADMIN_TOKEN)
        yield fleet
    finally:
        assert not fleet.close(), "children left running"


def call(channel: grpc.Channel, target: Target, payload: bytes,
         metadata: tuple[tuple[str, str], ...] = ()) -> tuple[grpc.StatusCode, str]:
    """Sends `payload` as the request; (status, details). Streams are read to the end (WatchLoad: one report)."""
    try:
        if target.method.server_streaming:
            responses = channel.unary_stream(target.path)(payload, timeout=CALL_TIMEOUT, metadata=metadata)
            for _ in responses:
                if target.method.name == "WatchLoad":  # endless by design: one report shows it answers
                    responses.cancel()
                    break
        else:
            channel.unary_unary(target.path)(payload, timeout=CALL_TIMEOUT, metadata=metadata)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.CANCELLED and target.method.name == "WatchLoad":
            return grpc.StatusCode.OK, ""
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def normal_request(process: str, endpoint: str) -> None:
    """One ordinary request the process must still serve."""
    with grpc.insecure_channel(endpoint) as channel:
        if process == "router":
            reply = inference_pb2_grpc.InferenceStub(channel).Complete(inference_pb2.GenerateRequest(
                model="llama-3-8b", prompt="still fine after fuzzing",
                sampling=common_pb2.SamplingParams(max_tokens=3)), timeout=30)
            assert len(reply.token_ids) == 3
        elif process == "p0":
            prefill = worker_pb2_grpc.PrefillStub(channel).Prefill(worker_pb2.PrefillRequest(
                model="llama-3-8b", prompt_token_ids=list(range(40, 80)),
                sampling=common_pb2.SamplingParams(max_tokens=4)), timeout=30)
            assert prefill.HasField("handle")
            worker_pb2_grpc.KvSourceStub(channel).Release(
                worker_pb2.KvReleaseRequest(handle_id=prefill.handle.handle_id), timeout=10)
        elif process == "d0":
            steps = list(worker_pb2_grpc.DecodeStub(channel).Decode(worker_pb2.DecodeRequest(
                model="llama-3-8b", prompt_token_ids=list(range(40, 60)),
                sampling=common_pb2.SamplingParams(max_tokens=4, ignore_eos=True)), timeout=30))
            assert sum(len(s.token_ids) for s in steps) == 4
        else:
            admin_pb2_grpc.AdminStub(channel).FleetStatus(admin_pb2.FleetStatusRequest(), timeout=10)


def assert_healthy(fleet: Fleet, process: str) -> None:
    child = fleet.children[process]
    assert child.alive(), f"{process} died under fuzzing:\n{child.log_tail()}"
    deadline = time.monotonic() + 10
    while (status := health_status(child.endpoint)) != "SERVING":
        assert time.monotonic() < deadline, f"{process} health is {status} after fuzzing"
        time.sleep(0.05)  # poll interval
    normal_request(process, child.endpoint)


def fuzz(fleet: Fleet, process: str, method_name: str, examples: int,
         draw: Callable[[type[Message]], st.SearchStrategy[bytes]], check: Check) -> None:
    method = next(m for s in SERVICES[process] for m in s.methods if m.full_name == method_name)
    target = Target(fleet.children[process], method)
    auth = st.sampled_from([(), (("authorization", f"Bearer {ADMIN_TOKEN}"),)]) if process == "cp" else st.just(())

    with grpc.insecure_channel(target.process.endpoint) as channel:
        @settings(max_examples=examples, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(payload=draw(target.request_type), metadata=auth)
        def run(payload: bytes, metadata: tuple[tuple[str, str], ...]) -> None:
            code, details = call(channel, target, payload, metadata)
            check(target.request_type, payload, code, details, bool(metadata))
            assert target.process.alive(), f"{process} died:\n{target.process.log_tail()}"

        run()
    assert_healthy(fleet, process)


def check_defined(request_type: type[Message], payload: bytes, code: grpc.StatusCode, details: str,
                  token: bool) -> None:
    assert code in DEFINED, (f"undefined status {code.name} ({details!r}) for "
                             f"{request_type.FromString(payload)!r:.300}")


def check_wire(request_type: type[Message], payload: bytes, code: grpc.StatusCode, details: str, token: bool) -> None:
    if decodes(request_type, payload):
        check_defined(request_type, payload, code, details, token)
    elif code == grpc.StatusCode.UNAUTHENTICATED:
        # The Admin token check runs before the request is parsed, as it should.
        assert not token and request_type.DESCRIPTOR.file is admin_pb2.DESCRIPTOR, (code, details)
    else:
        assert code == grpc.StatusCode.UNKNOWN and details.startswith(UNDECODABLE), (code, details, payload[:64])


@pytest.mark.parametrize(("process", "method"), TARGETS, ids=[f"{p}:{m.split('.')[-1]}" for p, m in TARGETS])
def test_schema_fuzzing_gets_only_defined_statuses(fuzz_fleet: Fleet, process: str, method: str) -> None:
    def serialized(cls: type[Message]) -> st.SearchStrategy[bytes]:
        return messages(cls).map(lambda m: m.SerializeToString())

    fuzz(fuzz_fleet, process, method, SCHEMA_EXAMPLES, serialized, check_defined)


@pytest.mark.parametrize(("process", "method"), TARGETS, ids=[f"{p}:{m.split('.')[-1]}" for p, m in TARGETS])
def test_wire_fuzzing_is_refused_cleanly(fuzz_fleet: Fleet, process: str, method: str) -> None:
    fuzz(fuzz_fleet, process, method, WIRE_EXAMPLES, raw_payloads, check_wire)


HUGE = "x" * 100_000
HUGE_FIELD_CASES = {
    "router:Complete.model": ("router", "/tandem.v1.Inference/Complete",
                              inference_pb2.GenerateRequest(model=HUGE, prompt="x")),
    "p0:Prefill.model": ("p0", "/tandem.v1.Prefill/Prefill",
                         worker_pb2.PrefillRequest(model=HUGE, prompt_token_ids=[65])),
    "p0:Pull.handle_id": ("p0", "/tandem.v1.KvSource/Pull", worker_pb2.KvPullRequest(handle_id=HUGE)),
    "d0:Decode.model": ("d0", "/tandem.v1.Decode/Decode",
                        worker_pb2.DecodeRequest(model=HUGE, prompt_token_ids=[65])),
    "cp:ListGpus.node": ("cp", "/tandem.v1.Admin/ListGpus", admin_pb2.ListGpusRequest(node=HUGE)),
    "cp:ListWorkers.model": ("cp", "/tandem.v1.Admin/ListWorkers", admin_pb2.ListWorkersRequest(model=HUGE)),
}


@pytest.mark.parametrize("case", list(HUGE_FIELD_CASES))
def test_a_huge_field_gets_a_short_error_naming_it(fuzz_fleet: Fleet, case: str) -> None:
    """A 100 KB string field is refused with INVALID_ARGUMENT or NOT_FOUND and a message a person can read,
    not echoed whole into grpc-message (past a client's metadata limit, which turns the answer into a
    transport error: RESOURCE_EXHAUSTED "Stream removed")."""
    process, path, request = HUGE_FIELD_CASES[case]
    method_name = path.rsplit("/", 1)[1]
    method = next(m for s in SERVICES[process] for m in s.methods if m.name == method_name)
    target = Target(fuzz_fleet.children[process], method)
    with grpc.insecure_channel(target.process.endpoint) as channel:
        code, details = call(channel, target, request.SerializeToString())
    assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (code, details[:200])
    assert len(details) <= 1024, f"{len(details)} characters of error details"


HANDLE_EXAMPLES = 60


def test_fuzzed_kv_handle_fields_get_only_defined_statuses(fuzz_fleet: Fleet) -> None:
    """A real KV handle with 1-3 of its fields (any of them, tcp/shm params included) fuzzed: Decode answers a
    defined status (never INTERNAL or UNKNOWN), connects nowhere it should not, and the worker stays healthy."""
    prompt = list(range(40, 60))
    sampling = common_pb2.SamplingParams(max_tokens=3, ignore_eos=True)
    p0, d0 = fuzz_fleet.children["p0"], fuzz_fleet.children["d0"]
    with grpc.insecure_channel(p0.endpoint) as p_channel, grpc.insecure_channel(d0.endpoint) as d_channel:
        reply = worker_pb2_grpc.PrefillStub(p_channel).Prefill(worker_pb2.PrefillRequest(
            model="llama-3-8b", prompt_token_ids=prompt, sampling=sampling), timeout=30)
        method = worker_pb2.DESCRIPTOR.services_by_name["Decode"].methods_by_name["Decode"]
        target = Target(d0, method)
        tcp_like = common_pb2.KvHandle()
        tcp_like.CopyFrom(reply.handle)
        tcp_like.transport = "tcp"
        tcp_like.transport_params.update(port="1", token="ab" * 16)

        @settings(max_examples=HANDLE_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(handle=st.one_of(mutations(reply.handle), mutations(tcp_like)))
        def run(handle: common_pb2.KvHandle) -> None:
            request = worker_pb2.DecodeRequest(model="llama-3-8b", prompt_token_ids=prompt, sampling=sampling,
                                               handle=handle, first_token_id=reply.first_token_id)
            code, details = call(d_channel, target, request.SerializeToString())
            assert code in DEFINED, f"undefined status {code.name} ({details!r}) for {handle!r:.300}"
            assert d0.alive(), f"d0 died:\n{d0.log_tail()}"

        run()
        worker_pb2_grpc.KvSourceStub(p_channel).Release(
            worker_pb2.KvReleaseRequest(handle_id=reply.handle.handle_id), timeout=10)
    assert_healthy(fuzz_fleet, "d0")
