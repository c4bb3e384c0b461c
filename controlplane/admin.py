"""The Admin gRPC servicer: thin adapters over the registry view, fleet.py and Registry.

Reads come from this replica's RegistryView, so they keep working (from the
last view, with FleetStatus.view_staleness_s saying how old) while etcd is
briefly away; they are UNAVAILABLE only before the view first loaded.
Mutations go to etcd through registry.store and are UNAVAILABLE,
naming the etcd endpoints, when it does not answer. Bad names and values are
INVALID_ARGUMENT naming the field. Authorization is the interceptor's job
(controlplane.auth), not this module's. Every mutation that places or
removes an intent is logged ("admin mutation": method, target, who, why).

Every method may run concurrently with the others.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from controlplane import fleet
from registry.election import leader_entry
from registry.etcd_client import EtcdUnavailable
from registry.keys import Kind, check_name
from registry.store import Registry
from registry.view import RegistryView
from runtime.text import cap, clip
from tandem.v1 import admin_pb2, admin_pb2_grpc, common_pb2, registry_pb2

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Intent = TypeVar("Intent", registry_pb2.DrainIntent, registry_pb2.CordonIntent)
Handler = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]

# Who asked for a drain, cordon or role switch, when the caller says so (tandemctl sends the user name).
REQUESTED_BY_METADATA = "tandem-requested-by"
MAX_REASON = 1024
_LEASE_LOOKUPS = 16


def _statuses(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Maps bad input to INVALID_ARGUMENT and etcd trouble to UNAVAILABLE."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        try:
            return await method(self, request, context)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, cap(str(exc)))
        except EtcdUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, cap(str(exc)))
        raise AssertionError("unreachable: abort raises")

    return wrapper


def _audit(method: str, target: str, requested_by: str, **details: str) -> None:
    """One log line per mutation that changed something: what, on what, who asked, and the details."""
    said = "".join(f", {key} {value!r}" for key, value in details.items() if value)
    log.info("admin mutation: %s %s by %s%s", method, target, requested_by, said,
             extra={"method": method, "target": target, "requested_by": requested_by, **details})


def _check_reason(reason: str) -> str:
    if len(reason) > MAX_REASON:
        raise ValueError(f"reason must be at most {MAX_REASON} characters, got {len(reason)}")
    return reason


def check_model_spec(spec: registry_pb2.ModelSpec) -> None:
    """ValueError naming the first bad field of `spec`."""
    check_name(spec.name, "spec.name")
    for name in ("ttft_ms", "inter_token_ms"):
        value = getattr(spec.slo, name)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"spec.slo.{name} must be a finite number >= 0, got {value}")
    if spec.max_context_tokens and spec.max_output_tokens > spec.max_context_tokens:
        raise ValueError(f"spec.max_output_tokens must be at most max_context_tokens ({spec.max_context_tokens}), "
                         f"got {spec.max_output_tokens}")
    for key in spec.engine_args:
        if not key or any(c.isspace() for c in key):
            raise ValueError(f"spec.engine_args keys must be non-empty without spaces, got {clip(key)}")


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, view: RegistryView, registry: Registry, *, replica_id: str) -> None:
        self.view = view
        self.registry = registry
        self.replica_id = replica_id

    # -- reads ------------------------------------------------------------------

    async def _snapshot(self, context: grpc.aio.ServicerContext) -> fleet.Snapshot:
        if not self.view.synced.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"registry not loaded yet: etcd at {self.registry.client.settings.describe()} "
                                "has not answered this replica")

        def records(kind: Kind) -> dict[str, Any]:
            return {name: entry.record for name, entry in self.view.entries(kind).items()}

        return fleet.Snapshot(nodes=records(Kind.NODE), workers=records(Kind.WORKER),
                              claims=records(Kind.GPU_CLAIM), health=records(Kind.HEALTH),
                              drains=records(Kind.DRAIN), cordons=records(Kind.CORDON))

    @_statuses
    async def FleetStatus(self, request: admin_pb2.FleetStatusRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.FleetStatusResponse:
        reply = fleet.fleet_status(await self._snapshot(context))
        leader = leader_entry(self.view.entries(Kind.ELECTION).values())
        if leader is not None:
            reply.leader.CopyFrom(leader.record)
        reply.answered_by = self.replica_id
        reply.revision = self.view.revision
        reply.view_staleness_s = self.view.staleness()
        return reply

    @_statuses
    async def ListNodes(self, request: admin_pb2.ListNodesRequest,
                        context: grpc.aio.ServicerContext) -> admin_pb2.ListNodesResponse:
        return admin_pb2.ListNodesResponse(nodes=fleet.node_statuses(await self._snapshot(context)))

    @_statuses
    async def ListGpus(self, request: admin_pb2.ListGpusRequest,
                       context: grpc.aio.ServicerContext) -> admin_pb2.ListGpusResponse:
        if request.node:
            check_name(request.node, "node")
        snapshot = await self._snapshot(context)
        gpus = fleet.gpu_statuses(snapshot, request.node)
        if request.node and not gpus and request.node not in fleet.known_nodes(snapshot):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"node {clip(request.node)} is not registered")
        return admin_pb2.ListGpusResponse(gpus=gpus)

    @_statuses
    async def ListWorkers(self, request: admin_pb2.ListWorkersRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.ListWorkersResponse:
        if request.model:
            check_name(request.model, "model")
        if request.node:
            check_name(request.node, "node")
        if request.role not in common_pb2.Role.values():
            raise ValueError(f"role must be one of {', '.join(common_pb2.Role.keys())}, got {request.role}")
        rows = fleet.worker_statuses(await self._snapshot(context), model=request.model, role=request.role,
                                     node=request.node)
        for row in rows:
            intent = self.view.get(Kind.ROLE, row.record.worker_id)
            if intent is not None:
                row.role_intent.CopyFrom(intent.record)
        return admin_pb2.ListWorkersResponse(workers=rows)

    @_statuses
    async def ListModelSpecs(self, request: admin_pb2.ListModelSpecsRequest,
                             context: grpc.aio.ServicerContext) -> admin_pb2.ListModelSpecsResponse:
        await self._snapshot(context)
        models = self.view.entries(Kind.MODEL)
        return admin_pb2.ListModelSpecsResponse(models=[models[name].record for name in sorted(models)])

    @_statuses
    async def GetPlan(self, request: admin_pb2.GetPlanRequest,
                      context: grpc.aio.ServicerContext) -> admin_pb2.GetPlanResponse:
        """The planner's latest plan per model (all models when `model` is empty; none: an empty list)."""
        if request.model:
            check_name(request.model, "model")
        await self._snapshot(context)
        plans = self.view.entries(Kind.PLAN)
        names = [request.model] if request.model else sorted(plans)
        return admin_pb2.GetPlanResponse(plans=[plans[name].record for name in names if name in plans])

    @_statuses
    async def ListLeases(self, request: admin_pb2.ListLeasesRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.ListLeasesResponse:
        """Asks etcd (not the view): leases are etcd's own state."""
        client, keys = self.registry.client, self.registry.keys
        limit = asyncio.Semaphore(_LEASE_LOOKUPS)

        async def lookup(lease_id: int) -> tuple[int, int, int, list[str]]:
            async with limit:
                granted, remaining, bound = await client.lease_info(lease_id)
            return lease_id, granted, remaining, bound

        found = await asyncio.gather(*(lookup(lease) for lease in await client.leases()))
        leaders = {name: e.record for name, e in self.view.entries(Kind.ELECTION).items()}
        claims = {name: e.record for name, e in self.view.entries(Kind.GPU_CLAIM).items()}
        leases = []
        for lease_id, granted, remaining, bound in found:
            ours = sorted(k for k in bound if k.startswith(keys.root))
            if remaining < 0 or (bound and not ours):
                continue  # expired meanwhile, or another application's lease
            refs = [ref for ref in map(keys.parse, ours) if ref is not None]
            leases.append(admin_pb2.LeaseInfo(lease_id=lease_id, granted_ttl_s=granted, remaining_ttl_s=remaining,
                                              keys=ours, holder=fleet.lease_holder(refs, leaders, claims)))
        leases.sort(key=lambda lease: (lease.holder, lease.lease_id))
        return admin_pb2.ListLeasesResponse(leases=leases)

    # -- mutations --------------------------------------------------------------

    @staticmethod
    def _requested_by(context: grpc.aio.ServicerContext) -> str:
        for key, value in context.invocation_metadata() or ():
            if key == REQUESTED_BY_METADATA:
                text = value.decode() if isinstance(value, bytes) else str(value)
                if text.isprintable() and 0 < len(text) <= 128:
                    return text
        return context.peer() or "unknown"

    async def _worker_known(self, worker_id: str) -> bool:
        # Ask etcd, not the view: a worker that registered a moment ago must be drainable.
        return await self.registry.get(Kind.WORKER, worker_id) is not None

    async def _node_known(self, node: str) -> bool:
        """An agent reports the node, or a worker runs on it."""
        if await self.registry.get(Kind.NODE, node) is not None:
            return True
        _, workers = await self.registry.list(Kind.WORKER)
        return any(entry.record.node == node for entry in workers)

    async def _place_intent(self, kind: Kind, name: str, reason: str, context: grpc.aio.ServicerContext, *,
                            known: Callable[[str], Awaitable[bool]], unknown: str,
                            place: Callable[[str, str, str], Awaitable[Intent]]) -> Intent:
        """A drain or cordon on `name`: NOT_FOUND (`unknown`) unless `known(name)`; then the intent
        already there, unchanged (idempotent), or a new one from `place(name, requested_by, reason)`."""
        reason = _check_reason(reason)
        if not await known(name):
            await context.abort(grpc.StatusCode.NOT_FOUND, unknown)
        existing = await self.registry.get(kind, name)
        if existing is not None:
            return existing.record
        requested_by = self._requested_by(context)
        intent = await place(name, requested_by, reason)
        _audit("DrainWorker" if kind is Kind.DRAIN else "CordonNode", name, requested_by, reason=reason)
        return intent

    @_statuses
    async def DrainWorker(self, request: admin_pb2.DrainWorkerRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.DrainWorkerResponse:
        """Idempotent: a second drain returns the first intent unchanged."""
        worker_id = check_name(request.worker_id, "worker_id")
        intent = await self._place_intent(
            Kind.DRAIN, worker_id, request.reason, context, known=self._worker_known,
            unknown=f"worker {clip(worker_id)} is not registered", place=self.registry.set_drain)
        return admin_pb2.DrainWorkerResponse(intent=intent)

    @_statuses
    async def UndrainWorker(self, request: admin_pb2.UndrainWorkerRequest,
                            context: grpc.aio.ServicerContext) -> admin_pb2.UndrainWorkerResponse:
        removed = await self.registry.clear_drain(check_name(request.worker_id, "worker_id"))
        if removed:
            _audit("UndrainWorker", request.worker_id, self._requested_by(context))
        return admin_pb2.UndrainWorkerResponse(removed=removed)

    @_statuses
    async def SetWorkerRole(self, request: admin_pb2.SetWorkerRoleRequest,
                            context: grpc.aio.ServicerContext) -> admin_pb2.SetWorkerRoleResponse:
        """A RoleIntent: the worker switches live. Idempotent: the same role again returns the intent there.

        INVALID_ARGUMENT for a role other than prefill or decode; NOT_FOUND for
        an unregistered worker; FAILED_PRECONDITION when its record does not
        list the role among its switchable_roles (its engine cannot switch
        without a restart, or it runs a version that cannot switch at all).
        """
        worker_id = check_name(request.worker_id, "worker_id")
        if request.role not in (common_pb2.ROLE_PREFILL, common_pb2.ROLE_DECODE):
            name = common_pb2.Role.Name(request.role) if request.role in common_pb2.Role.values() else request.role
            raise ValueError(f"role must be ROLE_PREFILL or ROLE_DECODE, got {name}")
        reason = _check_reason(request.reason)
        worker = await self.registry.get(Kind.WORKER, worker_id)
        if worker is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"worker {clip(worker_id)} is not registered")
            raise AssertionError("unreachable: abort raises")
        record: registry_pb2.WorkerRecord = worker.record
        role = common_pb2.Role.Name(request.role)
        if request.role not in record.switchable_roles:
            can = ", ".join(common_pb2.Role.Name(r) for r in record.switchable_roles) or "none"
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"worker {clip(worker_id)} cannot switch to {role} without a restart (its "
                                f"switchable roles: {can}; engine {record.engine or 'unknown'}, "
                                f"version {record.versions.tandem or 'unknown'})")
        existing = await self.registry.get(Kind.ROLE, worker_id)
        if existing is not None and existing.record.role == request.role:
            return admin_pb2.SetWorkerRoleResponse(intent=existing.record)
        requested_by = self._requested_by(context)
        intent = await self.registry.set_role(worker_id, request.role, requested_by, reason)
        _audit("SetWorkerRole", worker_id, requested_by, role=role, reason=reason)
        return admin_pb2.SetWorkerRoleResponse(intent=intent)

    @_statuses
    async def ClearWorkerRole(self, request: admin_pb2.ClearWorkerRoleRequest,
                              context: grpc.aio.ServicerContext) -> admin_pb2.ClearWorkerRoleResponse:
        """Removes the role intent; the worker keeps the role it has. `removed` False: there was none."""
        worker_id = check_name(request.worker_id, "worker_id")
        removed = await self.registry.clear_role(worker_id)
        if removed:
            _audit("ClearWorkerRole", worker_id, self._requested_by(context))
        return admin_pb2.ClearWorkerRoleResponse(removed=removed)

    @_statuses
    async def CordonNode(self, request: admin_pb2.CordonNodeRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.CordonNodeResponse:
        """Idempotent: a second cordon returns the first intent unchanged."""
        node = check_name(request.node, "node")
        intent = await self._place_intent(
            Kind.CORDON, node, request.reason, context, known=self._node_known,
            unknown=f"node {clip(node)} is not registered (no node agent and no worker reports it)",
            place=self.registry.set_cordon)
        return admin_pb2.CordonNodeResponse(intent=intent)

    @_statuses
    async def UncordonNode(self, request: admin_pb2.UncordonNodeRequest,
                           context: grpc.aio.ServicerContext) -> admin_pb2.UncordonNodeResponse:
        removed = await self.registry.clear_cordon(check_name(request.node, "node"))
        if removed:
            _audit("UncordonNode", request.node, self._requested_by(context))
        return admin_pb2.UncordonNodeResponse(removed=removed)

    @_statuses
    async def PutModelSpec(self, request: admin_pb2.PutModelSpecRequest,
                           context: grpc.aio.ServicerContext) -> admin_pb2.PutModelSpecResponse:
        if not request.HasField("spec"):
            raise ValueError("spec is required")
        check_model_spec(request.spec)
        await self.registry.put_model(request.spec)
        stored = await self.registry.get(Kind.MODEL, request.spec.name)
        return admin_pb2.PutModelSpecResponse(spec=stored.record if stored is not None else request.spec)

    @_statuses
    async def DeleteModelSpec(self, request: admin_pb2.DeleteModelSpecRequest,
                              context: grpc.aio.ServicerContext) -> admin_pb2.DeleteModelSpecResponse:
        name = check_name(request.name, "name")
        if not await self.registry.delete_model(name):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model spec {clip(name)} does not exist")
        return admin_pb2.DeleteModelSpecResponse()
