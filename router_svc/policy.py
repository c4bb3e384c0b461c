"""Routing policy: (request, fleet view, now) -> which decode worker, which prefill worker. Pure.

Zero I/O: the servicer hands in a `FleetView` snapshot and the time, and
gets a `Decision` or a typed `RouteError`. Time comes from the caller, so a
replay harness drives the same code deterministically.

Every policy shares one frame:

1. Eligibility of the candidates the policy visits: not in
   `request.exclude` (workers that already failed this request), context
   long enough, and (decode) enough free KV blocks for prompt + max_tokens
   and a free batch slot. Only routable workers are visited (the view's
   `ModelPool` keeps them apart). In a large fleet a decision visits
   `sample_size` workers of each role, drawn by the policy (the power of d
   choices: near the best of all at a fraction of the cost), and every
   worker only when none of those is eligible, so a full fleet is still
   told apart from a busy one.
2. Disaggregate or not. The decode worker prefills locally when the prompt
   is short ("short-prompt"), no prefill worker is eligible
   ("no-prefill-worker"), every eligible one has more than
   `prefill_queue_limit_tokens` queued ("prefill-saturated"), or the caller
   asks for it ("local-required", e.g. a migration that rebuilds the KV of
   prompt + generated tokens on the new worker).
3. The policy picks the decode worker, then (when disaggregated) the
   prefill worker for it. The reason is then the policy's name. Among
   equally good workers it draws one with its rng (seeded: reproducible),
   never the lowest id, which would herd a burst onto one worker.

Prefix caches: when the router's prefix index knows how much of the prompt
each worker holds (`RouteRequest.cached`, router_svc.prefix_index), a
policy that uses it (`uses_prefix_cache`) prices only the uncached part of
the prompt as prefill work on each candidate, and the workers holding the
longest prefix (`PolicyConfig.prefix_holders` per role) are visited on top
of the sample, so sampling never hides a cache hit. The decision between a
local and a remote prefill then uses the prompt's effective length: a long
prompt whose uncached rest on some eligible decode worker is short enough is
prefilled there ("prefix-cached"). Load still counts, so a worker holding a
popular prefix is not flooded: once its queue costs more than the prefix
saves, the next best worker wins (and caches the prefix too).

The request is priced with its model's shape as the model's workers publish
it (`RouteRequest.shape` overrides; `PolicyConfig.default_shape` when none
does). Each decision is noted in the policy's `InflightLedger`, and every
later decision sees it in the chosen workers' load until their load reports
can show it (router_svc.inflight).

No eligible decode worker: `NoCapacity` when some were only full (the
servicer answers RESOURCE_EXHAUSTED with `retry_after_s`), `NoWorker`
otherwise (UNAVAILABLE: none serves the model, or none is routable).

Cost: O(sample_size) per decision while some sampled worker is eligible,
O(candidates of the model) otherwise; no pairwise scoring.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from router_svc.candidates import Candidate, FleetView, ModelPool
from router_svc.costmodel import CostModel, ModelShape, blocks_needed
from router_svc.inflight import Assignment, InflightLedger
from router_svc.prefix_index import CachedPrefix

REASON_SHORT_PROMPT = "short-prompt"
REASON_NO_PREFILL = "no-prefill-worker"
REASON_PREFILL_SATURATED = "prefill-saturated"
REASON_LOCAL_REQUIRED = "local-required"
REASON_PREFIX_CACHED = "prefix-cached"


@dataclass(frozen=True)
class RouteRequest:
    """What the policy needs to know of one request (already validated and tokenized)."""

    model: str
    prompt_tokens: int
    max_tokens: int
    # The model's size and KV footprint; None: what the model's workers
    # publish, else PolicyConfig.default_shape.
    shape: ModelShape | None = None
    # Worker ids that already failed this request (retries, migration).
    exclude: frozenset[str] = frozenset()
    # Keep this decode worker if it is still eligible (retrying only the prefill).
    decode_worker_id: str = ""
    allow_remote_prefill: bool = True
    # Prompt tokens each worker holds in its prefix cache (the router's prefix index); None: unknown, and
    # the cost model falls back on each worker's lifetime hit rate.
    cached: CachedPrefix | None = None


@dataclass(frozen=True)
class Estimates:
    """The cost model's expectation for the chosen pair, in seconds."""

    prefill_queue_s: float = 0.0
    prefill_s: float = 0.0
    kv_transfer_s: float = 0.0
    # Prompt work already queued on the decode worker (remote prefill only;
    # for a local prefill it is prefill_queue_s).
    decode_queue_s: float = 0.0
    inter_token_s: float = 0.0
    decode_s: float = 0.0
    prefix_hit_tokens: int = 0

    @property
    def ttft_s(self) -> float:
        # The first token comes out of the prefill, wherever it runs.
        return self.prefill_queue_s + self.prefill_s


@dataclass(frozen=True)
class Decision:
    decode: Candidate
    # None: the decode worker prefills locally.
    prefill: Candidate | None
    # The policy's name when disaggregated, else why the prefill is local.
    reason: str
    policy: str
    # The cost model's view of the pair, priced when first read (`estimates`): most decisions are
    # never asked, and pricing costs as much as choosing.
    estimate: Callable[[], Estimates] = field(repr=False, compare=False)
    # The shape the request was priced with.
    shape: ModelShape = field(default_factory=ModelShape)

    @property
    def local_prefill(self) -> bool:
        return self.prefill is None

    @functools.cached_property
    def estimates(self) -> Estimates:
        return self.estimate()


class RouteError(Exception):
    """No decode worker can take the request; the message says why, for a person."""

    def __init__(self, model: str, message: str) -> None:
        super().__init__(message)
        self.model = model


class NoWorker(RouteError):
    """No routable worker serves the model now (UNAVAILABLE)."""


class NoCapacity(RouteError):
    """Routable workers exist but every one is full (RESOURCE_EXHAUSTED); retry after `retry_after_s`."""

    def __init__(self, model: str, message: str, retry_after_s: float) -> None:
        super().__init__(model, message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class PolicyConfig:
    # Prompts up to this many tokens are prefilled on the decode worker: a KV
    # transfer costs more than it saves.
    local_prefill_max_prompt_tokens: int = 256
    # A prefill worker with more queued prompt tokens than this is saturated.
    prefill_queue_limit_tokens: int = 65536
    # Load reports older than this (or none yet) add stale_load_penalty_s to
    # a candidate's expected time: prefer workers whose load is known.
    stale_load_s: float = 5.0
    stale_load_penalty_s: float = 0.25
    # Hint carried by NoCapacity.
    retry_after_s: float = 1.0
    # For models whose workers publish no shape.
    default_shape: ModelShape = field(default_factory=ModelShape)
    # The policy's own assignments count in a worker's load until a report
    # received inflight_reflect_s after the worker started the request (two
    # of the router's 50 ms load intervals), or for inflight_hold_s at most.
    # inflight_hold_s = 0: not counted.
    inflight_reflect_s: float = 0.1
    inflight_hold_s: float = 2.0
    # Scores within this share of the best are equal (ties drawn by the rng).
    tie_tolerance: float = 1e-9
    # Workers of each role a decision visits in a large fleet (0: every one).
    # The best of 8 random workers ranks on average in the best 1/9 of the
    # fleet, and a decision costs the same at 10 workers or 10,000: about
    # 80 us p50 against 3 ms for all of 1000 (bench/registry_scale.py).
    sample_size: int = 8
    # Workers of each role holding the longest cached prefix of the prompt that a decision visits
    # on top of the sample (prefix-aware policies only).
    prefix_holders: int = 4


@dataclass
class _Pools:
    decode: list[Candidate] = field(default_factory=list)
    # Eligible prefill workers with room in their queue, and those without.
    prefill: list[Candidate] = field(default_factory=list)
    saturated: list[Candidate] = field(default_factory=list)


class Policy(abc.ABC):
    """A routing policy. `choose` may run concurrently only for stateless policies.

    Every policy keeps its in-flight ledger (round-robin a counter too, and
    ties are drawn by an rng): the router holds one policy object and calls
    it from its event loop (one thread). `choose` notes the assignment it
    returns; call it only for requests that will be sent.
    """

    name: ClassVar[str]
    # Whether the policy reads RouteRequest.cached (the router looks prefixes up only for those that do).
    uses_prefix_cache: ClassVar[bool] = False

    def __init__(
        self,
        *,
        cost: CostModel | None = None,
        config: PolicyConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.cost = cost if cost is not None else CostModel()
        self.config = config or PolicyConfig()
        self.rng = rng if rng is not None else random.Random(0)
        self.inflight = InflightLedger(reflect_s=self.config.inflight_reflect_s, hold_s=self.config.inflight_hold_s)

    def choose(self, request: RouteRequest, view: FleetView, now: float) -> Decision:
        """The pair for `request` in `view` at time `now`, noted as in flight; raises NoWorker or NoCapacity."""
        pool = view.pool(request.model)
        pools = _Pools()
        self._eligible_decoders(pools, request, pool, now)
        if not pools.decode:
            raise self._no_decode_error(request, pool, now)
        shape = request.shape or pool.shape or self.config.default_shape

        local_reason = self._local_reason(request)
        if not local_reason:
            short = self._short_uncached(pools.decode, request)
            if short:
                local_reason, pools.decode = REASON_PREFIX_CACHED, short
        if not local_reason:
            self._eligible_prefillers(pools, request, pool, now)
            if not pools.prefill:
                local_reason = REASON_PREFILL_SATURATED if pools.saturated else REASON_NO_PREFILL
        decode = next((c for c in pools.decode if c.worker_id == request.decode_worker_id), None)
        kept = decode is not None
        if decode is None:
            decode = self.pick_decode(pools.decode, request, shape, now, local=bool(local_reason))
        prefill = None
        if not local_reason:
            prefill = self.pick_prefill(pools.prefill, decode, request, shape, now)
        decision = Decision(
            decode=decode,
            prefill=prefill,
            reason=local_reason or self.name,
            policy=self.name,
            estimate=functools.partial(self.estimate, prefill, decode, request, shape),
            shape=shape,
        )
        self._note(decision, request, now, decode_noted=kept)
        return decision

    @abc.abstractmethod
    def pick_decode(
        self, pool: Sequence[Candidate], request: RouteRequest, shape: ModelShape, now: float, *, local: bool
    ) -> Candidate:
        """One of `pool` (non-empty, sorted by worker_id); `local`: it will prefill too."""

    @abc.abstractmethod
    def pick_prefill(
        self, pool: Sequence[Candidate], decode: Candidate, request: RouteRequest, shape: ModelShape, now: float
    ) -> Candidate:
        """One of `pool` (non-empty, sorted by worker_id) to prefill for `decode`."""

    # -- shared frame ----------------------------------------------------------------

    def visit_order(self, members: Sequence[Candidate], role: str, request: RouteRequest,
                    limit: int | None) -> Sequence[Candidate]:
        """Which of `members` (routable, sorted by worker_id) a decision visits, in order; `role` is
        "decode" or "prefill". All of them when `limit` is None or not below their number, else `limit`
        drawn by the rng. Policies that walk workers in turn override it."""
        if limit is None or len(members) <= limit:
            return members
        return self.rng.sample(members, limit)

    def _sample_limit(self) -> int | None:
        return self.config.sample_size or None

    def _ineligible(self, c: Candidate, request: RouteRequest) -> tuple[str, str]:
        """("", "") when routable `c` may take the request, else ("full" or "unroutable", why)."""
        if c.worker_id in request.exclude:
            return "unroutable", "already failed this request"
        if c.role.decodes:
            context = request.prompt_tokens + request.max_tokens
            if c.max_context_tokens and context > c.max_context_tokens:
                return "unroutable", f"context under {context} tokens"
            if c.blocks_total:
                needed = blocks_needed(context, c.block_size)
                if c.free_blocks < needed:
                    return "full", f"under {needed} free KV blocks"
            if c.load is not None and c.batch_limit and c.load.active_sequences >= c.batch_limit:
                return "full", "batch full"
            return "", ""
        if c.max_context_tokens and request.prompt_tokens >= c.max_context_tokens:
            return "unroutable", f"context under {request.prompt_tokens + 1} tokens"
        return "", ""

    def _eligible_decoders(self, pools: _Pools, request: RouteRequest, pool: ModelPool, now: float) -> None:
        kept = pool.by_id.get(request.decode_worker_id) if request.decode_worker_id else None
        if kept is not None and kept.routable and kept.role.decodes:
            kept = self.inflight.apply(kept, now)
            if not self._ineligible(kept, request)[0]:
                pools.decode.append(kept)
                return  # kept while eligible: no other decoder is looked at
        limit = self._sample_limit()
        visited = self._with_holders(self.visit_order(pool.decoders, "decode", request, limit), pool, request,
                                     prefill=False)
        for listed in visited:
            c = self.inflight.apply(listed, now)
            if not self._ineligible(c, request)[0]:
                pools.decode.append(c)
        if not pools.decode:
            # None of the sample can take it: look at every worker, and judge "full" by what the workers
            # report, not by the ledger's estimate of work it sent them. The ledger spreads a burst; as a
            # verdict it held saturated routers in NoCapacity for up to a second, long after the work it
            # counted had finished. A worker really full refuses (RESOURCE_EXHAUSTED) and the request
            # moves on.
            for listed in self.visit_order(pool.decoders, "decode", request, None):
                if not self._ineligible(listed, request)[0]:
                    pools.decode.append(self.inflight.apply(listed, now))

    def _eligible_prefillers(self, pools: _Pools, request: RouteRequest, pool: ModelPool, now: float) -> None:
        def visit(members: Sequence[Candidate]) -> None:
            for listed in members:
                c = self.inflight.apply(listed, now)
                if not self._ineligible(c, request)[0]:
                    (pools.saturated if self._saturated(c) else pools.prefill).append(c)

        visited = self._with_holders(self.visit_order(pool.prefillers, "prefill", request, self._sample_limit()),
                                     pool, request, prefill=True)
        visit(visited)
        if not pools.prefill and len(visited) < len(pool.prefillers):
            pools.saturated.clear()
            visit(self.visit_order(pool.prefillers, "prefill", request, None))

    def _with_holders(self, visited: Sequence[Candidate], pool: ModelPool, request: RouteRequest, *,
                      prefill: bool) -> Sequence[Candidate]:
        """`visited` plus the routable workers of the role holding the longest prefix of the prompt."""
        cached, limit = request.cached, self.config.prefix_holders
        if cached is None or limit <= 0 or not self.uses_prefix_cache:
            return visited
        seen = {c.worker_id for c in visited}
        members = pool.prefillers if prefill else pool.decoders
        if len(seen) >= len(members):
            return visited

        def accept(worker_id: str) -> bool:
            c = pool.by_id.get(worker_id)
            return (worker_id not in seen and c is not None and c.routable
                    and (c.role.prefills_for_others if prefill else c.role.decodes))

        extra = [pool.by_id[w] for w, _ in cached.best(limit, prefill=prefill, accept=accept)]
        return [*visited, *extra] if extra else visited

    def uncached_tokens(self, c: Candidate, request: RouteRequest) -> int:
        """Prompt tokens `c` must compute: all of them, less what its prefix cache holds when that is known."""
        if request.cached is None or not self.uses_prefix_cache:
            return request.prompt_tokens
        return max(1, request.prompt_tokens - request.cached.tokens(c.worker_id))

    def _short_uncached(self, decoders: list[Candidate], request: RouteRequest) -> list[Candidate]:
        """The eligible decoders on which the prompt's uncached rest is short enough to prefill locally."""
        if request.cached is None or not self.uses_prefix_cache:
            return []
        limit = self.config.local_prefill_max_prompt_tokens
        return [c for c in decoders if self.uncached_tokens(c, request) <= limit]

    def _priced(self, c: Candidate, request: RouteRequest) -> Candidate:
        """`c` as the cost model should price it: where the index knows its cache, without its lifetime hit
        rate (the cost model would take that share off the uncached rest a second time)."""
        load = c.load
        if request.cached is None or load is None or not load.prefix_cache_hit_rate:
            return c
        return c.with_load(dataclasses.replace(load, prefix_cache_hit_rate=0.0))

    def _note(self, decision: Decision, request: RouteRequest, now: float, *, decode_noted: bool) -> None:
        """Notes the decision's work in the in-flight ledger, where each worker will see it start."""
        prompt, prefill = request.prompt_tokens, decision.prefill
        if prefill is not None:
            self.inflight.add(prefill.worker_id, Assignment(
                now, queued_tokens=self.uncached_tokens(prefill, request), kv_tokens=prompt))
        if decode_noted:
            return  # retrying only the prefill: the decode worker has it noted already
        # A remote prefill's decode worker sees the request once the prompt is prefilled and moved.
        # (Priced here as Estimates.ttft_s + kv_transfer_s, without the decode side the estimates also price.)
        lead = 0.0 if prefill is None else min(
            self.prefill_cost_s(prefill, request, decision.shape)
            + self.cost.kv_transfer_s(prompt, decision.shape, _same_host(prefill, decision.decode)),
            self.inflight.hold_s)
        self.inflight.add(decision.decode.worker_id, Assignment(
            now + lead, queued_tokens=self.uncached_tokens(decision.decode, request) if prefill is None else 0,
            kv_tokens=prompt + request.max_tokens // 2, sequences=1))

    def pick_least(self, pool: Sequence[Candidate], score: Callable[[Candidate], float]) -> Candidate:
        """The lowest-scoring candidate; one drawn by the rng among those within tie_tolerance of it."""
        if len(pool) == 1:
            return pool[0]  # nothing to compare: no scoring (a sole or kept worker, a small fleet's common case)
        scored = [(score(c), c) for c in pool]
        best = min(s for s, _ in scored)
        ties = [c for s, c in scored if s <= best + abs(best) * self.config.tie_tolerance]
        return ties[0] if len(ties) == 1 else self.rng.choice(ties)

    def _saturated(self, c: Candidate) -> bool:
        if c.load is None:
            return False
        if c.load.queued_prefill_tokens > self.config.prefill_queue_limit_tokens:
            return True
        # Not even room for this prompt's KV until queued work drains.
        return bool(c.blocks_total) and c.free_blocks == 0

    def _local_reason(self, request: RouteRequest) -> str:
        """Why the prefill is local whatever the prefill workers' state, or ""."""
        if not request.allow_remote_prefill:
            return REASON_LOCAL_REQUIRED
        if request.prompt_tokens <= self.config.local_prefill_max_prompt_tokens:
            return REASON_SHORT_PROMPT
        return ""

    def _no_decode_error(self, request: RouteRequest, pool: ModelPool, now: float) -> RouteError:
        """Why no decoder can take the request, tallied over every decoder of the model (the slow path)."""
        model = request.model
        if not pool.decoders_seen:
            extra = f" ({pool.prefillers_seen} prefill workers, none decodes)" if pool.prefillers_seen else ""
            return NoWorker(model, f"no worker serves model {model!r}{extra}")
        full: Counter[str] = Counter()
        unroutable: Counter[str] = Counter()
        for listed in pool.candidates:
            if not listed.role.decodes:
                continue
            if not listed.routable:
                unroutable[listed.unroutable] += 1
                continue
            kind, why = self._ineligible(listed, request)
            (full if kind == "full" else unroutable)[why] += 1
        tally = ", ".join(f"{n} {why}" for why, n in sorted((full + unroutable).items()))
        if full:
            hint = self.config.retry_after_s
            return NoCapacity(
                model,
                f"every decode worker for model {model!r} is busy ({tally}); retry after {hint:g}s",
                retry_after_s=hint,
            )
        return NoWorker(model, f"no routable decode worker for model {model!r} ({tally})")

    def stale_penalty_s(self, c: Candidate, now: float) -> float:
        age = c.load_age(now)
        if age is None or age > self.config.stale_load_s:
            return self.config.stale_load_penalty_s
        return 0.0

    def prefill_cost_s(self, c: Candidate, request: RouteRequest, shape: ModelShape) -> float:
        """Queued prompt work plus this prompt's (its uncached part, when the index knows)."""
        return self.cost.prefill_queue_s(c, shape) + self.prefill_s(c, request, shape)

    def prefill_s(self, c: Candidate, request: RouteRequest, shape: ModelShape) -> float:
        """This prompt's prefill on `c` once at the head of its queue."""
        if request.cached is None or not self.uses_prefix_cache:
            return self.cost.prefill_s(c, request.prompt_tokens, shape)
        return self.cost.prefill_s(self._priced(c, request), self.uncached_tokens(c, request), shape)

    def decode_cost_s(self, c: Candidate, request: RouteRequest, shape: ModelShape) -> float:
        itl = self.cost.inter_token_s(c, shape, request.prompt_tokens, request.max_tokens)
        return self.cost.prefill_queue_s(c, shape) + request.max_tokens * itl

    def estimate(
        self, prefill: Candidate | None, decode: Candidate, request: RouteRequest, shape: ModelShape
    ) -> Estimates:
        """The cost model's view of a pair, whatever policy chose it (for logs and metrics)."""
        cost = self.cost
        itl = cost.inter_token_s(decode, shape, request.prompt_tokens, request.max_tokens)
        on = prefill if prefill is not None else decode
        transfer = 0.0
        if prefill is not None:
            transfer = cost.kv_transfer_s(request.prompt_tokens, shape, _same_host(prefill, decode))
        known = request.cached is not None and self.uses_prefix_cache
        return Estimates(
            prefill_queue_s=cost.prefill_queue_s(on, shape),
            prefill_s=self.prefill_s(on, request, shape),
            kv_transfer_s=transfer,
            decode_queue_s=0.0 if prefill is None else cost.prefill_queue_s(decode, shape),
            inter_token_s=itl,
            decode_s=request.max_tokens * itl,
            prefix_hit_tokens=(request.prompt_tokens - self.uncached_tokens(on, request) if known
                               else cost.prefix_hit_tokens(on, request.prompt_tokens)),
        )


def _same_host(a: Candidate, b: Candidate) -> bool:
    return bool(a.host) and a.host == b.host


class ExpectedTimePolicy(Policy):
    """Least expected completion time, GPU-type and prefix-cache aware (see router_svc.costmodel)."""

    name = "expected-time"
    uses_prefix_cache = True

    def pick_decode(
        self, pool: Sequence[Candidate], request: RouteRequest, shape: ModelShape, now: float, *, local: bool
    ) -> Candidate:
        def score(c: Candidate) -> float:
            s = self.decode_cost_s(c, request, shape) + self.stale_penalty_s(c, now)
            if local:
                s += self.prefill_s(c, request, shape)
            return s

        return self.pick_least(pool, score)

    def pick_prefill(
        self, pool: Sequence[Candidate], decode: Candidate, request: RouteRequest, shape: ModelShape, now: float
    ) -> Candidate:
        def score(p: Candidate) -> float:
            transfer = self.cost.kv_transfer_s(request.prompt_tokens, shape, _same_host(p, decode))
            return self.prefill_cost_s(p, request, shape) + transfer + self.stale_penalty_s(p, now)

        return self.pick_least(pool, score)


class PrefixBlindExpectedTimePolicy(ExpectedTimePolicy):
    """Expected time as before the prefix index: every prompt token counts as prefill work, less each
    worker's lifetime hit rate. For comparison (bench/prefix_routing.py) and as a fallback."""

    name = "expected-time-prefix-blind"
    uses_prefix_cache = False
