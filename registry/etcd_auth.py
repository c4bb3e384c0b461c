"""Who may touch which registry keys: one etcd user and role per component, and provisioning them.

The plan is pure (`permission_plan`, `allowed`); `provision` applies it to
etcd through its Auth API and is safe to run again (it adds what is missing
and revokes grants the plan no longer has).

    role                 reads           writes (key layout: registry.keys)
    worker:{id}          {prefix}/       workers/{id} (that one key), gpus/{uuid} of its GPUs
                                         (the whole gpus/ prefix when its GPUs are not known up front)
    agent:{node}         {prefix}/       nodes/{node} (that one key)
    tandem-controlplane  {prefix}/       health/, admin/, models/, election/
    tandem-router        {prefix}/       nothing
    root                 everything      everything (the operator; etcd's built-in root role)

A worker's etcd user can thus neither write another worker's record nor a
verdict, a drain or a cordon; a router's can write nothing. etcd checks a
lease revoke against write permission on every key the lease holds, so each
process can revoke its own lease and no other. User names double as the
Common Name of the component's certificate (controlplane.pki): with etcd's
`--client-cert-auth` the certificate is the login, and no password exists.
Names that are not plain DNS labels are hashed (runtime.peers.identity_label)
so that a user name fits the 64 characters of a Common Name.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc
from etcd3aio.auth import AuthService, PermissionType
from etcd3aio.kv import prefix_range_end

from registry.etcd_client import EtcdClient
from registry.keys import Keys, Kind
from runtime.peers import identity_label

log = logging.getLogger(__name__)

CONTROLPLANE_USER = "tandem-controlplane"
ROUTER_USER = "tandem-router"
ROOT_USER = "root"


def worker_user(worker_id: str) -> str:
    """The etcd user (and certificate Common Name) of a worker. Pure."""
    return "worker:" + identity_label(worker_id)


def agent_user(node: str) -> str:
    """The etcd user (and certificate Common Name) of a node's agent. Pure."""
    return "agent:" + identity_label(node)


class Access(enum.Enum):
    READ = "read"
    READWRITE = "readwrite"


@dataclass(frozen=True)
class Grant:
    """One etcd permission: the key alone (`prefix` False) or every key starting with it."""

    key: str
    access: Access
    prefix: bool = False

    def covers(self, key: str) -> bool:
        return key.startswith(self.key) if self.prefix else key == self.key

    @property
    def range_end(self) -> str | None:
        return prefix_range_end(self.key).decode() if self.prefix else None


@dataclass(frozen=True)
class RolePlan:
    """A user, its one role (same name), and the role's grants."""

    user: str
    grants: tuple[Grant, ...]

    @property
    def role(self) -> str:
        return self.user


@dataclass(frozen=True)
class WorkerIdentity:
    """A worker to provision. `gpu_uuids` None: its GPUs are not known up front (the whole gpus/ prefix)."""

    worker_id: str
    node: str
    gpu_uuids: tuple[str, ...] | None = ()


def _read_all(keys: Keys) -> Grant:
    return Grant(keys.prefix + "/", Access.READ, prefix=True)


def worker_role(keys: Keys, worker: WorkerIdentity) -> RolePlan:
    grants = [_read_all(keys), Grant(keys.worker(worker.worker_id), Access.READWRITE)]
    if worker.gpu_uuids is None:
        grants.append(Grant(keys.kind_prefix(Kind.GPU_CLAIM), Access.READWRITE, prefix=True))
    else:
        grants += [Grant(keys.gpu_claim(uuid), Access.READWRITE) for uuid in worker.gpu_uuids]
    return RolePlan(worker_user(worker.worker_id), tuple(grants))


def agent_role(keys: Keys, node: str) -> RolePlan:
    return RolePlan(agent_user(node), (_read_all(keys), Grant(keys.node(node), Access.READWRITE)))


def controlplane_role(keys: Keys) -> RolePlan:
    writes = (Kind.HEALTH, Kind.DRAIN, Kind.CORDON, Kind.ROLE, Kind.MODEL, Kind.ELECTION, Kind.PLAN)
    return RolePlan(CONTROLPLANE_USER, (_read_all(keys), *(Grant(keys.kind_prefix(kind), Access.READWRITE,
                                                                 prefix=True) for kind in writes)))


def router_role(keys: Keys) -> RolePlan:
    # Routers share one certificate identity, so the grant is the whole demand/ prefix: a router could
    # misreport another's traffic, which misleads the planner but routes nothing (docs/security.md).
    return RolePlan(ROUTER_USER, (_read_all(keys), Grant(keys.kind_prefix(Kind.DEMAND), Access.READWRITE,
                                                        prefix=True)))


def permission_plan(keys: Keys, workers: Iterable[WorkerIdentity], nodes: Iterable[str]) -> list[RolePlan]:
    """Every role of a fleet: control plane, router, one per node agent, one per worker. Pure."""
    plan = [controlplane_role(keys), router_role(keys)]
    plan += [agent_role(keys, node) for node in dict.fromkeys(nodes)]
    plan += [worker_role(keys, worker) for worker in workers]
    return plan


def allowed(role: RolePlan, key: str, *, write: bool) -> bool:
    """Whether `role` may read (or write) `key` under the plan. Pure; etcd enforces the same grants."""
    return any(g.covers(key) and (not write or g.access is Access.READWRITE) for g in role.grants)


# -- applying the plan ---------------------------------------------------------

_PERM = {Access.READ: PermissionType.READ, Access.READWRITE: PermissionType.READWRITE}


def auth_api(client: EtcdClient) -> AuthService:
    """etcd's Auth API on `client`'s connection (connect() first)."""
    return client.auth_api


async def _ignore_exists(call: object) -> None:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        if "already exists" not in (exc.details() or ""):
            raise


async def provision(client: EtcdClient, plan: Sequence[RolePlan], *, root_password: str,
                    timeout: float = 5.0) -> None:
    """Creates each planned user and role (certificate login, no password), sets their grants to the
    plan's exactly, makes sure `root` exists, then enables auth. Safe to run again with root's
    credentials once auth is on. Raises grpc/etcd3aio errors as they come."""
    auth = auth_api(await client.connect())
    await _ignore_exists(auth.user_add(ROOT_USER, root_password, timeout=timeout))
    await _ignore_exists(auth.user_grant_role(ROOT_USER, "root", timeout=timeout))
    for role in plan:
        await _ignore_exists(auth.role_add(role.role, timeout=timeout))
        have = {(bytes(p.key).decode(), bytes(p.range_end).decode(), int(p.permType))
                for p in (await auth.role_get(role.role, timeout=timeout)).perm}
        want = {(g.key, g.range_end or "", int(_PERM[g.access])) for g in role.grants}
        for key, range_end, _ in have - want:
            await auth.role_revoke_permission(role.role, key, range_end or None, timeout=timeout)
        for grant in role.grants:
            if (grant.key, grant.range_end or "", int(_PERM[grant.access])) not in have:
                await auth.role_grant_permission(role.role, grant.key, grant.range_end,
                                                 perm_type=_PERM[grant.access], timeout=timeout)
        await _ignore_exists(auth.user_add(role.user, no_password=True, timeout=timeout))
        await _ignore_exists(auth.user_grant_role(role.user, role.role, timeout=timeout))
    status = await auth.auth_status(timeout=timeout)
    if not status.enabled:
        await auth.auth_enable(timeout=timeout)
    log.info("etcd auth provisioned", extra={"roles": len(plan)})
