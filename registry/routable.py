"""Whether a worker may get new requests: the one rule the routers and the Admin API share. Pure.

Plain values only (no protobuf, no I/O): the router's policy snapshots
(router_svc.candidates) and the control plane's fleet answers
(controlplane.fleet) both call `unroutable_reason`, so `tandemctl get
workers` says "routable" exactly when a router would route to the worker.
`registry.routable_pb` converts the tandem.v1 enums to these values.
"""

from __future__ import annotations

import enum


class WorkerState(enum.Enum):
    """Mirrors tandem.v1.WorkerState; UNKNOWN stands for an unset state."""

    UNKNOWN = "unknown"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    # Changing role live: takes no new work until READY in its new role.
    SWITCHING = "switching"


class Health(enum.Enum):
    """The control-plane prober's verdict (mirrors tandem.v1.ServingStatus); UNKNOWN: none yet."""

    UNKNOWN = "unknown"
    SERVING = "serving"
    NOT_SERVING = "not_serving"


def unroutable_reason(
    *,
    state: WorkerState,
    drain_requested: bool,
    node_cordoned: bool,
    health: Health,
    load_draining: bool = False,
) -> str:
    """Why a worker must not get new requests, or "" when it may.

    Routable: READY, no drain intent (nor a load report saying it drains),
    its node not cordoned, and a verdict other than NOT_SERVING. A verdict
    of UNKNOWN is routable: a worker that just became READY should not wait
    for the prober's first round. The reasons are short, stable words the
    router logs and counts ("draining", "cordoned", ...).
    """
    if state is not WorkerState.READY:
        return "draining" if state is WorkerState.DRAINING else f"state-{state.value}"
    if drain_requested:
        return "drain-requested"
    if load_draining:
        return "draining"
    if node_cordoned:
        return "cordoned"
    if health is Health.NOT_SERVING:
        return "not-serving"
    return ""
