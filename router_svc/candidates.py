"""Workers as the routing policy sees them: immutable snapshots, no I/O.

The router's registry view (etcd records, health verdicts, drain and cordon
intents) and its WatchLoad subscriptions build a `FleetView` whenever
something changes; the policy reads one `FleetView` per decision and never
blocks. Everything here is a frozen value: a view may be shared by any
number of concurrent decisions.

`router_svc.candidates_pb` turns tandem.v1 messages into these values; this
module imports neither protobuf nor grpc, so tests build views from plain
numbers. Whether a worker is routable is registry.routable's rule, shared
with the control plane's Admin API.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from registry import routable
from registry.routable import Health, WorkerState


class Role(enum.Enum):
    """Mirrors tandem.v1.Role."""

    PREFILL = "prefill"
    DECODE = "decode"
    # Prefills and decodes on the same GPUs: a decode candidate that can also
    # import a KV cache prefilled elsewhere.
    UNIFIED = "unified"

    @property
    def decodes(self) -> bool:
        return self is not Role.PREFILL

    @property
    def prefills_for_others(self) -> bool:
        # Unified workers serve Decode; only dedicated prefill workers export
        # KV caches for another worker to decode.
        return self is Role.PREFILL


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs to know about a model. Defaults: a Llama-3-8B-like model in bf16.

    Workers publish theirs in the registry (WorkerRecord.model_shape); the
    policy prices a request with the shape its model's workers publish.
    """

    # Parameters doing matmul work per token.
    params: float = 8e9
    # K and V for every layer and KV head: 2 * layers * kv_heads * head_dim * bytes.
    kv_bytes_per_token: float = 2 * 32 * 8 * 128 * 2
    # Weight bytes read per decode step, per active parameter.
    bytes_per_param: float = 2.0

    def __post_init__(self) -> None:
        if not self.params > 0:
            raise ValueError(f"params must be > 0, got {self.params}")
        if not self.kv_bytes_per_token >= 0:
            raise ValueError(f"kv_bytes_per_token must be >= 0, got {self.kv_bytes_per_token}")
        if not self.bytes_per_param > 0:
            raise ValueError(f"bytes_per_param must be > 0, got {self.bytes_per_param}")

    @property
    def flops_per_token(self) -> float:
        # One multiply-add per parameter per token; attention's share is small
        # at the prompt lengths routing decisions hinge on.
        return 2.0 * self.params

    @property
    def weight_bytes(self) -> float:
        return self.params * self.bytes_per_param


@dataclass(frozen=True, slots=True)
class Load:
    """The latest LoadReport of one worker (fast-changing; never in etcd)."""

    queued_prefill_tokens: int = 0
    active_requests: int = 0
    active_sequences: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    kv_block_size: int = 0
    max_batch_size: int = 0
    draining: bool = False
    # Prefix-cache hit rate over the worker's lifetime, 0..1.
    prefix_cache_hit_rate: float = 0.0
    # When the router received the report, on the router's own monotonic
    # clock (the same clock as the `now` given to the policy), so the age of
    # a report never depends on clock skew between hosts.
    received_at: float = 0.0


def unroutable_reason(
    *,
    state: WorkerState,
    drain_requested: bool,
    load_draining: bool,
    node_cordoned: bool,
    health: Health,
    model: str,
) -> str:
    """Why a worker must not get new requests, or "" when it may: "no-model" for a
    record without a model, otherwise `registry.routable.unroutable_reason`. Pure."""
    if not model:
        return "no-model"
    return routable.unroutable_reason(state=state, drain_requested=drain_requested, node_cordoned=node_cordoned,
                                      health=health, load_draining=load_draining)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One worker: its registry record, its latest load, and whether it is routable.

    Capacity fields come from the registry record; `load`, when present, is
    fresher and the policy prefers its figures. Build with `make_candidate`
    so `unroutable` is always computed the same way.
    """

    worker_id: str
    role: Role
    model: str
    endpoint: str
    node: str = ""
    host: str = ""
    gpu_type: str = ""
    gpu_count: int = 1
    kv_blocks_total: int = 0
    kv_block_size: int = 0
    max_batch_size: int = 0
    # 0: no limit known beyond the model's.
    max_context_tokens: int = 0
    kv_transports: tuple[str, ...] = ()
    # The served model's shape as the worker published it; None: not published.
    shape: ModelShape | None = None
    load: Load | None = None
    # "" when routable; otherwise the first reason it is not.
    unroutable: str = ""

    @property
    def routable(self) -> bool:
        return not self.unroutable

    def load_age(self, now: float) -> float | None:
        """Seconds since the latest load report arrived; None before the first one."""
        return None if self.load is None else max(0.0, now - self.load.received_at)

    # The load report's figures win over the record's: capacity can change
    # (a KV cache resized after warm-up) and the report is the fresher.
    @property
    def blocks_total(self) -> int:
        if self.load is not None and self.load.kv_blocks_total:
            return self.load.kv_blocks_total
        return self.kv_blocks_total

    @property
    def block_size(self) -> int:
        if self.load is not None and self.load.kv_block_size:
            return self.load.kv_block_size
        return self.kv_block_size

    @property
    def batch_limit(self) -> int:
        if self.load is not None and self.load.max_batch_size:
            return self.load.max_batch_size
        return self.max_batch_size

    @property
    def free_blocks(self) -> int:
        used = self.load.kv_blocks_used if self.load is not None else 0
        return max(0, self.blocks_total - used)


def make_candidate(
    *,
    worker_id: str,
    role: Role,
    model: str,
    endpoint: str,
    state: WorkerState = WorkerState.READY,
    drain_requested: bool = False,
    node_cordoned: bool = False,
    health: Health = Health.UNKNOWN,
    load: Load | None = None,
    **record: object,
) -> Candidate:
    """A Candidate whose routability follows `unroutable_reason`.

    `record` takes the remaining Candidate fields (node, host, gpu_type,
    gpu_count, kv_blocks_total, kv_block_size, max_batch_size,
    max_context_tokens, kv_transports, shape).
    """
    reason = unroutable_reason(
        state=state,
        drain_requested=drain_requested,
        load_draining=load.draining if load is not None else False,
        node_cordoned=node_cordoned,
        health=health,
        model=model,
    )
    return Candidate(
        worker_id=worker_id, role=role, model=model, endpoint=endpoint, load=load, unroutable=reason,
        **record,  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class FleetView:
    """Every known worker, grouped by model, at one moment. Immutable; share freely.

    Candidates of a model are kept sorted by worker_id, so policies that walk
    them in order (round-robin) behave the same whatever order the watch
    delivered the records in.
    """

    by_model: Mapping[str, tuple[Candidate, ...]] = field(default_factory=dict)
    # Registry revision the view reflects (0: unknown); for logs and tests.
    revision: int = 0

    @classmethod
    def of(cls, candidates: Iterable[Candidate], revision: int = 0) -> FleetView:
        """Groups `candidates` by model. A worker_id seen twice keeps its last entry."""
        unique: dict[str, Candidate] = {}
        for c in candidates:
            unique[c.worker_id] = c
        grouped: dict[str, list[Candidate]] = {}
        for c in unique.values():
            grouped.setdefault(c.model, []).append(c)
        return cls(
            by_model={m: tuple(sorted(cs, key=lambda c: c.worker_id)) for m, cs in grouped.items()},
            revision=revision,
        )

    def candidates(self, model: str) -> tuple[Candidate, ...]:
        return self.by_model.get(model, ())

    def models(self) -> list[str]:
        return sorted(self.by_model)

    def __iter__(self) -> Iterator[Candidate]:
        for cs in self.by_model.values():
            yield from cs

    def get(self, worker_id: str) -> Candidate | None:
        """The candidate with this id, or None. O(workers): for tools and tests, not the hot path."""
        return next((c for c in self if c.worker_id == worker_id), None)

    def routable_counts(self, model: str) -> tuple[int, int]:
        """(prefill, decode) workers routable now for `model`, as ListModels reports them."""
        prefill = decode = 0
        for c in self.candidates(model):
            if c.routable:
                prefill += c.role.prefills_for_others
                decode += c.role.decodes
        return prefill, decode
