"""Every etcd key path Tandem uses, built and parsed in one place.

Layout (prefix default "/tandem"; docs/registry.md is the reference):

    {prefix}/v1/nodes/{node}                    NodeRecord      agent's lease
    {prefix}/v1/workers/{worker_id}             WorkerRecord    worker's lease
    {prefix}/v1/gpus/{gpu_uuid}                 GpuClaim        worker's lease (create-only)
    {prefix}/v1/health/{worker_id}              HealthVerdict   leader's lease
    {prefix}/v1/admin/drain/{worker_id}         DrainIntent     none
    {prefix}/v1/admin/cordon/{node}             CordonIntent    none
    {prefix}/v1/admin/role/{worker_id}          RoleIntent      none
    {prefix}/v1/models/{model}                  ModelSpec       none
    {prefix}/v1/election/controlplane/{lease}   LeaderRecord    candidate's lease
    {prefix}/v1/demand/{router_id}              DemandReport    router's lease
    {prefix}/v1/plans/{model}                   PlanRecord      none
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from runtime.text import clip

DEFAULT_PREFIX = "/tandem"
API_VERSION = "v1"


_NAME = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class Kind(enum.Enum):
    """What a registry key holds; the value is the path segment(s) under {prefix}/v1/."""

    NODE = "nodes"
    WORKER = "workers"
    GPU_CLAIM = "gpus"
    HEALTH = "health"
    DRAIN = "admin/drain"
    CORDON = "admin/cordon"
    ROLE = "admin/role"
    MODEL = "models"
    ELECTION = "election/controlplane"
    DEMAND = "demand"
    PLAN = "plans"


def check_name(name: str, what: str = "name") -> str:
    """Returns `name` if it is a valid key segment; ValueError naming `what` otherwise."""
    if not _NAME.match(name or ""):
        raise ValueError(f"{what} must be 1..128 characters of A-Z a-z 0-9 . _ : -, got {clip(name)}")
    return name


@dataclass(frozen=True)
class KeyRef:
    """A parsed registry key."""

    kind: Kind
    name: str


class Keys:
    """Key builder for one registry prefix. Pure: no I/O."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        prefix = "/" + prefix.strip("/")
        if prefix == "/":
            raise ValueError("the etcd prefix must not be empty or '/'")
        self.prefix = prefix
        self.root = f"{prefix}/{API_VERSION}/"

    def kind_prefix(self, kind: Kind) -> str:
        """Prefix of every key of `kind`, ending in '/'."""
        return f"{self.root}{kind.value}/"

    def key(self, kind: Kind, name: str) -> str:
        return self.kind_prefix(kind) + check_name(name, kind.name.lower())

    def node(self, node: str) -> str:
        return self.key(Kind.NODE, node)

    def worker(self, worker_id: str) -> str:
        return self.key(Kind.WORKER, worker_id)

    def gpu_claim(self, gpu_uuid: str) -> str:
        return self.key(Kind.GPU_CLAIM, gpu_uuid)

    def health(self, worker_id: str) -> str:
        return self.key(Kind.HEALTH, worker_id)

    def drain(self, worker_id: str) -> str:
        return self.key(Kind.DRAIN, worker_id)

    def cordon(self, node: str) -> str:
        return self.key(Kind.CORDON, node)

    def role(self, worker_id: str) -> str:
        return self.key(Kind.ROLE, worker_id)

    def demand(self, router_id: str) -> str:
        return self.key(Kind.DEMAND, router_id)

    def plan(self, model: str) -> str:
        return self.key(Kind.PLAN, model)

    def model(self, name: str) -> str:
        return self.key(Kind.MODEL, name)

    def election(self, lease_id: int) -> str:
        return self.kind_prefix(Kind.ELECTION) + f"{lease_id:016x}"

    def parse(self, key: str | bytes) -> KeyRef | None:
        """The kind and name of a registry key; None for keys outside the layout."""
        text = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
        if not text.startswith(self.root):
            return None
        rest = text[len(self.root):]
        # Longest kind first: "admin/drain/x" must not parse as kind "admin".
        for kind in sorted(Kind, key=lambda k: -len(k.value)):
            head = kind.value + "/"
            if rest.startswith(head):
                name = rest[len(head):]
                if kind is Kind.ELECTION:
                    return KeyRef(kind, name) if re.fullmatch(r"[0-9a-f]{16}", name) else None
                return KeyRef(kind, name) if _NAME.match(name) else None
        return None
