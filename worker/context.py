"""What a worker's services share (`WorkerContext`), and the shape of one role's services (`WorkerRole`).

A worker process mounts the services of every role over one loaded engine
(worker.prefill_service, worker.decode_service); the role gate
(worker.role_gate) decides which role's requests it takes now.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from engine.base import Engine
from runtime.sampling import Sampling, check_model, check_prompt, sampling_from_proto
from tandem.v1 import common_pb2, worker_pb2
from worker.admission import Admission
from worker.metrics import WorkerMetrics
from worker.role_gate import RoleGate
from worker.settings import WorkerSettings


@dataclass
class WorkerContext:
    """What a role's servicers get: the engine, admission, the role gate, identity."""

    settings: WorkerSettings
    worker_id: str
    node: str
    host: str
    engine: Engine
    admission: Admission
    metrics: WorkerMetrics
    gate: RoleGate

    @property
    def role(self) -> common_pb2.Role.ValueType:
        """The role the worker serves now (the target role while a switch is under way)."""
        return self.gate.role

    def check_request(self, request: worker_pb2.PrefillRequest | worker_pb2.DecodeRequest
                      ) -> tuple[Sampling, tuple[int, ...]]:
        """A Prefill or Decode request's sampling and prompt, checked against this worker's model
        (runtime.sampling's rules, the router's too); InvalidRequest names the field."""
        engine = self.engine
        check_model(engine.model_name, request.model)
        sampling = sampling_from_proto(request.sampling, max_output_tokens=engine.max_context_tokens)
        prompt = check_prompt(request.prompt_token_ids, vocab_size=engine.tokenizer.vocab_size,
                              max_context_tokens=engine.max_context_tokens, max_tokens=sampling.max_tokens,
                              model=engine.model_name)
        return sampling, prompt


class WorkerRole(abc.ABC):
    """One role's services (mounted on every worker, whatever role it serves) and its part of the load report."""

    role: common_pb2.Role.ValueType
    role_name: str
    service_names: Sequence[str]

    @abc.abstractmethod
    def mount(self, ctx: WorkerContext, server: grpc.aio.Server) -> None:
        """Adds the role's servicers to `server` (called once, before start)."""

    async def started(self, endpoint: str) -> None:  # noqa: B027 - optional hook
        """Called once the gRPC server is bound, with the endpoint others dial."""

    def fill_load(self, report: worker_pb2.LoadReport) -> None:  # noqa: B027 - optional hook
        """Adds role-specific counters to a load report (default: nothing)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Frees the role's resources (KV handles...). Safe to call twice."""
