"""Registry records: tandem.v1 messages stored as canonical proto3 JSON.

Every record carries `schema_version`. `encode` stamps the current version;
`decode` refuses values that are not JSON of the expected message, name
another record, or come from a newer schema, returning None and logging why
(a bad value in etcd must never crash a watcher or the Admin API).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from registry.keys import Kind
from tandem.v1 import registry_pb2

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

RECORD_TYPES: dict[Kind, type[Message]] = {
    Kind.NODE: registry_pb2.NodeRecord,
    Kind.WORKER: registry_pb2.WorkerRecord,
    Kind.GPU_CLAIM: registry_pb2.GpuClaim,
    Kind.HEALTH: registry_pb2.HealthVerdict,
    Kind.DRAIN: registry_pb2.DrainIntent,
    Kind.CORDON: registry_pb2.CordonIntent,
    Kind.MODEL: registry_pb2.ModelSpec,
    Kind.ELECTION: registry_pb2.LeaderRecord,
    Kind.ROLE: registry_pb2.RoleIntent,
    Kind.DEMAND: registry_pb2.DemandReport,
    Kind.PLAN: registry_pb2.PlanRecord,
}


class RecordError(ValueError):
    """A value that is not a valid record; the message says why."""


def encode(record: Message) -> bytes:
    """JSON bytes of `record`, stamped with the current schema version. Does not modify `record`."""
    stamped = type(record)()
    stamped.CopyFrom(record)
    stamped.schema_version = SCHEMA_VERSION  # type: ignore[attr-defined]
    return json_format.MessageToJson(stamped, indent=None, sort_keys=True).encode()


def parse(kind: Kind, value: bytes) -> Message:
    """The record of `kind` in `value`; RecordError with the reason otherwise."""
    message = RECORD_TYPES[kind]()
    try:
        json_format.Parse(value.decode("utf-8"), message, ignore_unknown_fields=True)
    except (UnicodeDecodeError, json_format.ParseError) as exc:
        raise RecordError(f"not a {message.DESCRIPTOR.name}: {exc}") from None
    version = message.schema_version  # type: ignore[attr-defined]
    if version == 0:
        raise RecordError(f"{message.DESCRIPTOR.name} without schema_version")
    if version > SCHEMA_VERSION:
        raise RecordError(
            f"{message.DESCRIPTOR.name} schema_version {version} is newer than this reader's {SCHEMA_VERSION}"
        )
    return message


def now_ms() -> int:
    """Wall-clock milliseconds, the unit of every *_unix_ms field in a record."""
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Entry:
    """One decoded registry value with the etcd metadata needed for compare-and-set."""

    kind: Kind
    name: str
    record: Any  # the tandem.v1 message for `kind`
    mod_revision: int
    create_revision: int
    lease: int


def from_kv(kind: Kind, name: str, value: bytes, mod_revision: int, create_revision: int = 0,
            lease: int = 0, *, key: str = "") -> Entry | None:
    """An Entry, or None (logged with the key and reason) when `value` is malformed."""
    try:
        record = parse(kind, value)
    except RecordError as exc:
        log.warning("skipping malformed registry value", extra={"key": key or name, "reason": str(exc)})
        return None
    return Entry(kind, name, record, mod_revision, create_revision, lease)
