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

import bisect
import dataclasses
import enum
from collections import Counter
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
    # Transformer layers (each costs a tensor-parallel all-reduce); 0: estimated from `params`.
    num_layers: int = 0

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

    def with_load(self, load: Load | None) -> Candidate:
        """This candidate with another load (routability kept). `dataclasses.replace` costs twice as much, and
        the policy calls this for every worker it visits that has work in flight."""
        return Candidate(self.worker_id, self.role, self.model, self.endpoint, self.node, self.host, self.gpu_type,
                         self.gpu_count, self.kv_blocks_total, self.kv_block_size, self.max_batch_size,
                         self.max_context_tokens, self.kv_transports, self.shape, load, self.unroutable)

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


@dataclass(frozen=True, slots=True)
class ModelPool:
    """One model's workers, indexed for decisions that touch only a few of them. Immutable.

    Built once per change of the model's workers (the router's live view
    rebuilds only the models a change touched), so a decision never walks
    every worker: it samples `decoders` and `prefillers`, finds a worker by id
    in `by_id`, and reads the published `shape`.
    """

    # Every worker of the model, sorted by worker_id.
    candidates: tuple[Candidate, ...] = ()
    # The routable ones that decode, and those that prefill for others, sorted by worker_id.
    decoders: tuple[Candidate, ...] = ()
    prefillers: tuple[Candidate, ...] = ()
    by_id: Mapping[str, Candidate] = field(default_factory=dict)
    # The shape most routable workers publish (they differ only mid-rollout); None: none published.
    shape: ModelShape | None = None
    # Workers of each kind, routable or not (for error messages).
    decoders_seen: int = 0
    prefillers_seen: int = 0

    @classmethod
    def of(cls, candidates: Iterable[Candidate]) -> ModelPool:
        """The pool of `candidates` (one model's; any order, unique worker ids)."""
        ordered = tuple(sorted(candidates, key=_worker_id))
        decoders = tuple(c for c in ordered if c.routable and c.role.decodes)
        prefillers = tuple(c for c in ordered if c.routable and c.role.prefills_for_others)
        shapes = Counter(c.shape for c in ordered if c.routable and c.shape is not None)
        common = shapes.most_common(1)
        return cls(
            candidates=ordered, decoders=decoders, prefillers=prefillers,
            by_id={c.worker_id: c for c in ordered}, shape=common[0][0] if common else None,
            decoders_seen=sum(c.role.decodes for c in ordered),
            prefillers_seen=sum(c.role.prefills_for_others for c in ordered),
        )


_EMPTY_POOL = ModelPool()


class ModelPoolBuilder:
    """Keeps one model's ModelPool current as its workers change; not thread-safe.

    A load report changes a worker's figures, not its place: `put` of a
    worker whose role, routability and shape are unchanged is replayed into
    copies of the last pool's sequences at its sorted position (O(log n) per
    worker, plus C-speed copies once per `build`). Anything else (a worker
    joins, leaves, becomes routable or not) rebuilds the pool once at the
    next `build`.
    """

    def __init__(self) -> None:
        self._members: dict[str, Candidate] = {}
        self._pool = _EMPTY_POOL
        self._replaced: dict[str, Candidate] = {}
        self._rebuild = False

    def __len__(self) -> int:
        return len(self._members)

    def put(self, candidate: Candidate) -> None:
        old = self._members.get(candidate.worker_id)
        self._members[candidate.worker_id] = candidate
        if (old is not None and not self._rebuild and old.routable == candidate.routable
                and old.role is candidate.role and old.shape == candidate.shape):
            self._replaced[candidate.worker_id] = candidate
        else:
            self._rebuild = True

    def remove(self, worker_id: str) -> None:
        if self._members.pop(worker_id, None) is not None:
            self._rebuild = True

    def build(self) -> ModelPool:
        """The pool as of now (the same object when nothing changed)."""
        if self._rebuild:
            self._pool = ModelPool.of(self._members.values())
        elif self._replaced:
            self._pool = _with_replaced(self._pool, self._replaced.values())
        self._rebuild = False
        self._replaced.clear()
        return self._pool


def _with_replaced(pool: ModelPool, replacements: Iterable[Candidate]) -> ModelPool:
    """`pool` with candidates swapped for same-id ones of the same role and routability."""
    candidates, decoders, prefillers = list(pool.candidates), list(pool.decoders), list(pool.prefillers)
    by_id = dict(pool.by_id)
    for c in replacements:
        by_id[c.worker_id] = c
        _swap(candidates, c)
        if c.routable and c.role.decodes:
            _swap(decoders, c)
        if c.routable and c.role.prefills_for_others:
            _swap(prefillers, c)
    return dataclasses.replace(pool, candidates=tuple(candidates), decoders=tuple(decoders),
                               prefillers=tuple(prefillers), by_id=by_id)


def _swap(ordered: list[Candidate], c: Candidate) -> None:
    i = bisect.bisect_left(ordered, c.worker_id, key=_worker_id)
    if i == len(ordered) or ordered[i].worker_id != c.worker_id:
        raise KeyError(f"{c.worker_id} is not in the pool")
    ordered[i] = c


def _worker_id(c: Candidate) -> str:
    return c.worker_id


@dataclass(frozen=True)
class FleetView:
    """Every known worker, grouped by model, at one moment. Immutable; share freely.

    Candidates of a model are kept sorted by worker_id, so policies that walk
    them in order (round-robin) behave the same whatever order the watch
    delivered the records in. Give either `by_model` (pools are built from
    it) or `pools` (prebuilt, as the router's live view does; `by_model`
    then follows from them).
    """

    by_model: Mapping[str, tuple[Candidate, ...]] = field(default_factory=dict)
    # Registry revision the view reflects (0: unknown); for logs and tests.
    revision: int = 0
    pools: Mapping[str, ModelPool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pools and not self.by_model:
            object.__setattr__(self, "by_model", {m: p.candidates for m, p in self.pools.items()})
        elif self.by_model and not self.pools:
            object.__setattr__(self, "pools", {m: ModelPool.of(cs) for m, cs in self.by_model.items()})

    @classmethod
    def of(cls, candidates: Iterable[Candidate], revision: int = 0) -> FleetView:
        """Groups `candidates` by model. A worker_id seen twice keeps its last entry."""
        unique: dict[str, Candidate] = {}
        for c in candidates:
            unique[c.worker_id] = c
        grouped: dict[str, list[Candidate]] = {}
        for c in unique.values():
            grouped.setdefault(c.model, []).append(c)
        return cls(pools={m: ModelPool.of(cs) for m, cs in grouped.items()}, revision=revision)

    def pool(self, model: str) -> ModelPool:
        """The model's pool (empty when no worker serves it)."""
        return self.pools.get(model, _EMPTY_POOL)

    def candidates(self, model: str) -> tuple[Candidate, ...]:
        return self.pool(model).candidates

    def models(self) -> list[str]:
        return sorted(self.pools)

    def __iter__(self) -> Iterator[Candidate]:
        for pool in self.pools.values():
            yield from pool.candidates

    def get(self, worker_id: str) -> Candidate | None:
        """The candidate with this id, or None. O(models)."""
        for pool in self.pools.values():
            found = pool.by_id.get(worker_id)
            if found is not None:
                return found
        return None

    def routable_counts(self, model: str) -> tuple[int, int]:
        """(prefill, decode) workers routable now for `model`, as ListModels reports them."""
        pool = self.pool(model)
        return len(pool.prefillers), len(pool.decoders)
