"""GPU claims: a worker holds its GPUs exclusively, under its lease.

`/tandem/v1/gpus/{uuid}` is created only where absent (one transaction on
`create_revision == 0` for every GPU of the worker), so two workers can never
hold one GPU; a claim goes with its holder's lease.
"""

from __future__ import annotations

from registry.keys import Keys, Kind
from registry.records import RecordError, encode, now_ms, parse
from registry.session import ClaimConflict, LeaseSession
from tandem.v1 import common_pb2, registry_pb2


class GpuAlreadyClaimed(Exception):
    """A GPU is held by another worker; the message names the GPU and its holder."""

    def __init__(self, holders: dict[str, str]) -> None:
        self.holders = holders  # gpu uuid -> worker id
        described = ", ".join(f"{gpu} is held by worker {worker}" for gpu, worker in sorted(holders.items()))
        super().__init__(described)


async def claim_gpus(session: LeaseSession, keys: Keys, worker_id: str, role: common_pb2.Role.ValueType,
                     node: str, gpu_uuids: list[str]) -> None:
    """Claims every GPU for `worker_id` in one transaction, or none.

    Raises GpuAlreadyClaimed naming each holder. Claims go with the lease.
    """
    items = []
    for uuid in gpu_uuids:
        claim = registry_pb2.GpuClaim(gpu_uuid=uuid, worker_id=worker_id, role=role, node=node,
                                      claimed_at_unix_ms=now_ms())
        items.append((keys.gpu_claim(uuid), encode(claim)))
    try:
        await session.claim(items)
    except ClaimConflict as exc:
        holders = {}
        for key, kv in exc.holders.items():
            ref = keys.parse(key)
            try:
                holder = parse(Kind.GPU_CLAIM, kv.value).worker_id  # type: ignore[attr-defined]
            except RecordError:
                holder = "(unreadable claim)"
            holders[ref.name if ref else key] = holder
        raise GpuAlreadyClaimed(holders) from None
