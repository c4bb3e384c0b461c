"""tandem.v1 WorkerState and ServingStatus -> the plain values of registry.routable. Pure."""

from __future__ import annotations

from registry.routable import Health, WorkerState
from tandem.v1 import registry_pb2

_STATES = {
    registry_pb2.WORKER_STATE_STARTING: WorkerState.STARTING,
    registry_pb2.WORKER_STATE_READY: WorkerState.READY,
    registry_pb2.WORKER_STATE_DRAINING: WorkerState.DRAINING,
    registry_pb2.WORKER_STATE_SWITCHING: WorkerState.SWITCHING,
}

_HEALTH = {
    registry_pb2.SERVING_STATUS_SERVING: Health.SERVING,
    registry_pb2.SERVING_STATUS_NOT_SERVING: Health.NOT_SERVING,
}

_HEALTH_TO_PB = {value: key for key, value in _HEALTH.items()}


def worker_state_from_pb(state: registry_pb2.WorkerState.ValueType) -> WorkerState:
    """An unset or unknown state reads as UNKNOWN (not routable)."""
    return _STATES.get(state, WorkerState.UNKNOWN)


def health_to_pb(health: Health) -> registry_pb2.ServingStatus.ValueType:
    """The status a verdict stores; UNKNOWN is never written (no verdict says it)."""
    return _HEALTH_TO_PB.get(health, registry_pb2.SERVING_STATUS_UNSPECIFIED)


def health_from_pb(verdict: registry_pb2.HealthVerdict | None) -> Health:
    """A verdict's status; no verdict, or an unset or unknown status, reads as UNKNOWN."""
    return Health.UNKNOWN if verdict is None else _HEALTH.get(verdict.status, Health.UNKNOWN)
