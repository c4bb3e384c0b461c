"""A discrete-event simulation of a sim-engine fleet on a virtual clock, for bench/fleet.py.

Each worker is the sim engine's own scheduler (engine.sim.scheduler:
continuous batching, chunked prefill, KV blocks, preemption) charged the sim
engine's step time (engine.sim.roofline: the calibrated step model of
docs/costmodel.md unless the params say "roofline"), exactly as SimEngine
runs them, minus asyncio: steps follow each other on a virtual clock, so an hour
of fleet time costs seconds of CPU. Requests are routed by the router's own
policy (router_svc.policy, expected-time by default) over `Candidate`s built
from each worker's live load, as the router sees its WatchLoad reports
(with no report delay). A request the policy cannot place waits in a router
backlog and is tried again whenever a sequence finishes.

Disaggregated: Prefill on P (first token) -> KV transfer (bytes / link rate,
no contention) -> import on the D chosen with P -> decode. Aggregated: the
decode worker prefills locally (the policy's "no-prefill-worker").

Live role switching (`FleetSim.switch`), as a real worker does it on a role
intent: from the switch on the worker is not routable (a WorkerState other
than READY) and takes no new work of its old role; what it holds finishes.
Prefills complete (their KV still goes to the decode worker chosen with
them). Decode sequences run to their end, or, those still running
`HANDOVER_GRACE_S` after the switch began, are handed over: aborted here and
migrated as the router migrates a lost stream (a decode worker the policy
picks re-prefills prompt + tokens so far locally, "local-required", then
continues the stream). A KV import that reaches the worker once it switches
is a new Decode call it refuses: the router sends it to another decode worker,
which pulls the same KV. When nothing is left the worker serves the new role
(the model stays loaded: no load time). A switch costs only that drain.

Two ways to drive a run: `run()` (fleet.py: one Poisson workload, early exit
once the attainment target is lost) and `load()` + `advance()` (a fixed
trace of `Record`s, e.g. `shifting_trace`'s time-varying arrivals, with the
caller acting between steps of virtual time: reading `records` and
`workers`, calling `switch`). Each Record keeps its TTFT and its mean
inter-token time over the stream (`tpot`), for goodput at an SLO.

Not a benchmark by itself (running it does nothing; `make bench` should skip bench/_*.py).
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from engine.base import Sampling
from engine.byte_tokenizer import byte_token
from engine.sim import GpuSet, ModelProfile, RooflineParams, kv_capacity_blocks, step_seconds
from engine.sim.blocks import BlockManager
from engine.sim.scheduler import Produced, Scheduler
from engine.sim.sequence import Sequence, SequenceKind, StopRules
from engine.sim.tokens import TokenStream
from registry.routable import WorkerState
from router_svc.candidates import Candidate, FleetView, Load, Role, make_candidate
from router_svc.costmodel import ModelShape
from router_svc.policy import NoCapacity, NoWorker, Policy, RouteRequest

BLOCK_SIZE = 16
# A switching worker's decode sequences still running this long after the switch began are handed over.
HANDOVER_GRACE_S = 30.0
_FILLER = [1000 + (i * 7919) % 100000 for i in range(32768)]
# Every output token (a printable byte of the byte tokenizer, never EOS).
_OUTPUT_TOKEN = byte_token(ord("x"))


@dataclass(frozen=True)
class Workload:
    """Poisson arrivals; prompt and output lengths uniform within ±spread of their means."""

    input_tokens: int = 3000
    output_tokens: int = 150
    spread: float = 0.1
    ttft_slo_s: float = 2.0
    tpot_slo_s: float = 0.05
    # Share of requests that must meet both SLOs for a rate to count as goodput.
    attainment: float = 0.9

    def describe(self) -> str:
        return (f"Poisson arrivals; input {self.input_tokens} / output {self.output_tokens} tokens "
                f"(uniform +-{self.spread:.0%}); SLOs: TTFT <= {self.ttft_slo_s:g} s and mean inter-token "
                f"(TPOT) <= {self.tpot_slo_s * 1000:g} ms, both met by >= {self.attainment:.0%} of requests")


@dataclass(frozen=True)
class WorkerSpec:
    worker_id: str
    role: Role
    gpus: GpuSet
    host: str
    max_batch: int = 256
    max_step_tokens: int = 8192


@dataclass
class Record:
    """One request and what happened to it (times on the virtual clock)."""

    arrival: float
    prompt: int
    output: int
    first_at: float | None = None
    last_at: float | None = None
    tokens: int = 0
    first_token: int = 0
    done: bool = False
    # Which phase of a shifting trace it arrived in (0 for a plain workload).
    phase: int = 0
    # Times its stream was handed over to another decode worker, and its longest gap between two tokens.
    migrations: int = 0
    max_gap: float = 0.0

    @property
    def ttft(self) -> float:
        return math.inf if self.first_at is None else self.first_at - self.arrival

    @property
    def tpot(self) -> float:
        """Mean inter-token time of the whole stream (0 for a single token; inf when unfinished)."""
        if not self.done or self.first_at is None or self.last_at is None:
            return math.inf
        return (self.last_at - self.first_at) / (self.tokens - 1) if self.tokens > 1 else 0.0

    def meets(self, ttft_s: float, tpot_s: float) -> bool:
        """Finished with TTFT <= `ttft_s` and mean inter-token time <= `tpot_s`."""
        return self.done and self.ttft <= ttft_s and self.tpot <= tpot_s

    def ok(self, w: Workload) -> bool:
        return self.meets(w.ttft_slo_s, w.tpot_slo_s)


@dataclass(frozen=True)
class Switch:
    """One live role switch: asked at `started`, serving `to_role` from `ended` (None: still switching)."""

    worker_id: str
    from_role: Role
    to_role: Role
    started: float
    ended: float | None = None
    # Decode streams it handed over at the grace deadline.
    handed_over: int = 0


class _Worker:
    def __init__(self, spec: WorkerSpec, profile: ModelProfile, params: RooflineParams) -> None:
        self.spec = spec
        self.profile = profile
        self.params = params
        self.blocks = BlockManager(kv_capacity_blocks(spec.gpus, profile, BLOCK_SIZE, params), BLOCK_SIZE)
        self.sched = Scheduler(self.blocks, spec.max_batch, spec.max_step_tokens)
        self.busy = False
        self.plan: list = []
        self.live = 0
        self.imports: deque[tuple[Record, list[int]]] = deque()
        # The role it serves (the one it is switching to while `switch` is set), and since when.
        self.role = spec.role
        self.role_since = 0.0
        self.switch: Switch | None = None
        # Sequences admitted here and not finished: what a switch hands over.
        self.seqs: set[Sequence] = set()

    def candidate(self, model: str, now: float) -> Candidate:
        s = self.spec
        load = Load(queued_prefill_tokens=self.sched.queued_prefill_tokens, active_requests=self.live,
                    active_sequences=self.sched.num_holding_kv, kv_blocks_used=self.blocks.num_used,
                    kv_blocks_total=self.blocks.num_blocks, kv_block_size=BLOCK_SIZE, max_batch_size=s.max_batch,
                    received_at=now)
        # A switching worker is not routable (the registry's SWITCHING state is not READY either).
        state = WorkerState.READY if self.switch is None else WorkerState.DRAINING
        return make_candidate(worker_id=s.worker_id, role=self.role, model=model, endpoint=s.worker_id, load=load,
                              state=state, host=s.host, gpu_type=s.gpus.gpu.catalog_id, gpu_count=s.gpus.count,
                              kv_blocks_total=self.blocks.num_blocks, kv_block_size=BLOCK_SIZE,
                              max_batch_size=s.max_batch)


class _FillerStream(TokenStream):
    """Draws one fixed token forever: the fleet's outputs ignore EOS and nobody reads them, so only their
    count matters, and hashing every context (TokenStream's draw) costs a tenth of the run's CPU."""

    def __init__(self, position: int) -> None:  # no super().__init__: none of its state is used
        self.position = position

    def next(self) -> int:
        self.position += 1
        return _OUTPUT_TOKEN


def model_shape(profile: ModelProfile) -> ModelShape:
    """The router cost model's view of a sim profile."""
    return ModelShape(params=profile.active_params, kv_bytes_per_token=profile.kv_bytes_per_token,
                      bytes_per_param=profile.weight_bytes / profile.total_params)


class FleetSim:
    """One run through `specs`. Use once: `run()`, or `load()` then `advance()`; then read `records`."""

    def __init__(self, specs: Seq[WorkerSpec], profile: ModelProfile, params: RooflineParams, policy: Policy,
                 workload: Workload, *, same_host_kv_bytes_per_s: float, cross_host_kv_bytes_per_s: float) -> None:
        self.workers = {s.worker_id: _Worker(s, profile, params) for s in specs}
        self.profile = profile
        self.policy = policy
        self.workload = workload
        self.shape = model_shape(profile)
        self.same_host_rate = same_host_kv_bytes_per_s
        self.cross_host_rate = cross_host_kv_bytes_per_s
        self.records: list[Record] = []
        self._events: list[tuple[float, int, str, object]] = []
        self._order = itertools.count()
        self._backlog: deque[tuple[Record, list[int]]] = deque()
        self._model = profile.profile_id
        # Indices of requests that finished since the run loop last looked.
        self._newly_settled: list[int] = []
        # Streams handed over by a switching worker, waiting for a decode worker to re-prefill them (FIFO).
        self._migrating: deque[tuple[Record, int]] = deque()
        self.switches: list[Switch] = []
        self.now = 0.0

    # -- driving --------------------------------------------------------------------

    def run(self, arrivals: Seq[float], rng: random.Random, *, judge: range, horizon_s: float) -> float:
        """Simulates every arrival; returns the share of `judge` (record indices) meeting both SLOs.

        Stops early once that share can no longer reach the workload's
        attainment, or at `horizon_s` of virtual time (unfinished requests fail).
        """
        w = self.workload
        for i, t in enumerate(arrivals):
            prompt = max(2, round(w.input_tokens * (1 + w.spread * (2 * rng.random() - 1))))
            output = max(2, round(w.output_tokens * (1 + w.spread * (2 * rng.random() - 1))))
            self.records.append(Record(t, prompt, output))
            self._push(t, "arrive", i)
        allowed = math.floor(len(judge) * (1 - w.attainment))
        failed = 0
        judged: set[int] = set()
        while self._events:
            now, _, kind, payload = heapq.heappop(self._events)
            if now > horizon_s:
                break
            self._handle(now, kind, payload)
            # Early exit: count failures as soon as they are certain.
            if kind == "step":
                for index in self._newly_settled:
                    if index in judge and index not in judged:
                        judged.add(index)
                        failed += not self.records[index].ok(w)
                self._newly_settled.clear()
                if failed > allowed:
                    return 0.0
        met = sum(1 for i in judge if self.records[i].ok(w))
        return met / max(1, len(judge))

    def load(self, records: Seq[Record]) -> None:
        """Queues a trace (arrivals ascending); `advance` then plays it."""
        for record in records:
            self.records.append(record)
            self._push(record.arrival, "arrive", len(self.records) - 1)

    def advance(self, until: float) -> None:
        """Plays every event up to virtual time `until` (requests unfinished then are still in flight)."""
        while self._events and self._events[0][0] <= until:
            now, _, kind, payload = heapq.heappop(self._events)
            self._handle(now, kind, payload)
        self._newly_settled.clear()
        self.now = max(self.now, until)

    @property
    def idle(self) -> bool:
        """Nothing left to happen: every request finished or was dropped."""
        return not self._events

    def _handle(self, now: float, kind: str, payload: object) -> None:
        self.now = now
        if kind == "arrive":
            assert isinstance(payload, int)
            self._route(self.records[payload], payload, now)
        elif kind == "step":
            assert isinstance(payload, str)
            self._step_done(self.workers[payload], now)
        elif kind == "grace":
            assert isinstance(payload, tuple)
            self._grace_over(self.workers[payload[0]], payload[1], now)
        else:
            assert isinstance(payload, tuple)
            self._import(payload[0], payload[1], payload[2], payload[3], now)

    def _push(self, t: float, kind: str, payload: object) -> None:
        heapq.heappush(self._events, (t, next(self._order), kind, payload))

    # -- role switches --------------------------------------------------------------

    def switch(self, worker_id: str, role: Role) -> Switch | None:
        """Starts a live switch of `worker_id` to `role` now; None when it already serves (or heads for) it.

        Asked while a switch is under way, it retargets that switch; back to
        the role it is leaving, the worker is at once routable again in it.
        """
        worker = self.workers[worker_id]
        now = self.now
        if worker.role is role:
            return None
        if worker.switch is not None:
            self._end_switch(worker, now, cancelled=worker.switch.from_role is role)
            if worker.role is role:
                return None
        worker.switch = Switch(worker_id, worker.role, role, now)
        worker.role = role
        self._push(now + HANDOVER_GRACE_S, "grace", (worker_id, worker.switch))
        self._settle_switch(worker, now)
        return worker.switch

    def _grace_over(self, worker: _Worker, switch: Switch, now: float) -> None:
        if worker.switch is not switch:
            return
        # Decode streams (and imports waiting to join) move; prefills always finish where they are.
        streams = [seq for seq in worker.seqs if seq.kind is SequenceKind.DECODE]
        moved = len(streams) + len(worker.imports)
        for seq in streams:
            worker.sched.abort(seq)
            worker.seqs.discard(seq)
            worker.live -= 1
            record, index, _ = seq.sink
            self._migrating.append((record, index))
        while worker.imports:
            record, (index,) = worker.imports.popleft()
            self._migrating.append((record, index))
        worker.switch = dataclasses.replace(switch, handed_over=moved)
        self._retry_migrations(now)
        self._settle_switch(worker, now)

    def _settle_switch(self, worker: _Worker, now: float) -> None:
        """Ends the worker's switch once it holds nothing of its old role."""
        if worker.switch is not None and not worker.seqs and not worker.imports and not worker.busy:
            self._end_switch(worker, now, cancelled=False)
            self._retry_migrations(now)
            self._retry_backlog(now)

    def _end_switch(self, worker: _Worker, now: float, *, cancelled: bool) -> None:
        assert worker.switch is not None
        done = dataclasses.replace(worker.switch, ended=now)
        self.switches.append(done)
        if cancelled:
            worker.role = done.from_role
        else:
            worker.role_since = now
        worker.switch = None

    def _retry_migrations(self, now: float) -> None:
        """Handed-over streams go first (they are accepted requests): each to a decode worker that re-prefills
        prompt + tokens so far, as the router migrates a stream ("local-required")."""
        while self._migrating:
            record, index = self._migrating[0]
            request = RouteRequest(model=self._model, prompt_tokens=record.prompt + record.tokens,
                                   max_tokens=max(1, record.output - record.tokens), shape=self.shape,
                                   allow_remote_prefill=False)
            view = FleetView.of(w.candidate(self._model, now) for w in self.workers.values())
            try:
                decision = self.policy.choose(request, view, now)
            except (NoCapacity, NoWorker):
                return
            self._migrating.popleft()
            record.migrations += 1
            prompt = self._prompt(index, record.prompt)
            sampling = Sampling(max_tokens=record.output, ignore_eos=True)
            delivered = tuple(_FILLER[: record.tokens])
            seq = self._sequence(index, SequenceKind.DECODE, [*prompt, *delivered], sampling, delivered)
            seq.sink = (record, index, None)
            self._admit(self.workers[decision.decode.worker_id], seq, now)

    def _prompt(self, index: int, n: int) -> list[int]:
        # A distinct first token per request: no prefix-cache hits between requests.
        return [3 + index % 120000, *_FILLER[: n - 1]]

    # -- routing --------------------------------------------------------------------

    def _route(self, record: Record, index: int, now: float) -> bool:
        view = FleetView.of(w.candidate(self._model, now) for w in self.workers.values())
        request = RouteRequest(model=self._model, prompt_tokens=record.prompt, max_tokens=record.output,
                               shape=self.shape)
        try:
            decision = self.policy.choose(request, view, now)
        except (NoCapacity, NoWorker):
            self._backlog.append((record, [index]))
            return False
        decode = self.workers[decision.decode.worker_id]
        prompt = self._prompt(index, record.prompt)
        sampling = Sampling(max_tokens=record.output, ignore_eos=True)
        if decision.prefill is None:
            seq = self._sequence(index, SequenceKind.DECODE, prompt, sampling, ())
            seq.sink = (record, index, None)
            self._admit(decode, seq, now)
        else:
            prefill = self.workers[decision.prefill.worker_id]
            seq = self._sequence(index, SequenceKind.PREFILL, prompt, sampling, ())
            seq.sink = (record, index, decode)
            self._admit(prefill, seq, now)
        return True

    def _retry_backlog(self, now: float) -> None:
        while self._backlog:
            record, (index,) = self._backlog[0]
            self._backlog.popleft()
            if not self._route(record, index, now):
                # Still no room: it went back at the tail; restore FIFO order and stop.
                self._backlog.appendleft(self._backlog.pop())
                return

    # -- workers --------------------------------------------------------------------

    def _sequence(self, index: int, kind: SequenceKind, tokens: list[int], sampling: Sampling,
                  delivered: tuple[int, ...]) -> Sequence:
        stream = _FillerStream(len(tokens))
        rules = StopRules(sampling, self.profile.max_context_tokens, delivered)
        return Sequence(f"r{index}", kind, tokens, stream, rules, arrived_at=0.0)

    def _admit(self, worker: _Worker, seq: Sequence, now: float) -> None:
        worker.live += 1
        worker.seqs.add(seq)
        worker.sched.add(seq)
        self._kick(worker, now)

    def _kick(self, worker: _Worker, now: float) -> None:
        if worker.busy:
            return
        plan = worker.sched.schedule(now)
        if not plan:
            return
        seconds = step_seconds(worker.spec.gpus, self.profile, [(p.new, p.cached) for p in plan], worker.params)
        worker.busy, worker.plan = True, plan
        self._push(now + seconds, "step", worker.spec.worker_id)

    def _step_done(self, worker: _Worker, now: float) -> None:
        worker.busy = False
        finished = False
        for produced in worker.sched.complete(worker.plan, now):
            finished |= self._deliver(worker, produced, now)
        worker.plan = []
        if finished:
            for other in self.workers.values():
                self._drain_imports(other, now)
            self._retry_migrations(now)
            self._retry_backlog(now)
        self._kick(worker, now)
        if worker.switch is not None:
            self._settle_switch(worker, now)

    def _deliver(self, worker: _Worker, produced: Produced, now: float) -> bool:
        """Books one produced token; True when it ended a sequence here (blocks were freed)."""
        record, index, decode = produced.seq.sink
        if produced.seq.kind is SequenceKind.PREFILL:
            worker.live -= 1
            worker.seqs.discard(produced.seq)
            record.first_at, record.tokens, record.first_token = now, 1, produced.token
            record.last_at = now
            self._push(now + self._transfer_s(record, worker.spec.host, decode), "import",
                       (record, index, decode, worker.spec.host))
            return True
        if record.first_at is None:
            record.first_at = now
        elif record.last_at is not None:
            record.max_gap = max(record.max_gap, now - record.last_at)
        record.tokens += 1
        record.last_at = now
        if produced.finish_reason is not None:
            record.done = True
            worker.live -= 1
            worker.seqs.discard(produced.seq)
            self._newly_settled.append(index)
            return True
        return False

    def _transfer_s(self, record: Record, source_host: str, decode: _Worker) -> float:
        nbytes = record.prompt * self.profile.kv_bytes_per_token
        return nbytes / (self.same_host_rate if decode.spec.host == source_host else self.cross_host_rate)

    def _import(self, record: Record, index: int, worker: _Worker, source_host: str, now: float) -> None:
        if worker.switch is not None:
            # A new Decode call: the switching worker refuses it, and the router tries another decode worker
            # with the same KV handle (a migration if none can take it now).
            request = RouteRequest(model=self._model, prompt_tokens=record.prompt, max_tokens=record.output,
                                   shape=self.shape)
            view = FleetView.of(w.candidate(self._model, now) for w in self.workers.values())
            try:
                other = self.workers[self.policy.choose(request, view, now).decode.worker_id]
            except (NoCapacity, NoWorker):
                self._migrating.append((record, index))
                return
            self._push(now + self._transfer_s(record, source_host, other), "import",
                       (record, index, other, source_host))
            return
        worker.imports.append((record, [index]))
        self._drain_imports(worker, now)

    def _drain_imports(self, worker: _Worker, now: float) -> None:
        """KV that arrived on `worker` joins its batch once blocks are free (FIFO), as an import would."""
        admitted = False
        while worker.imports:
            record, (index,) = worker.imports[0]
            prompt = self._prompt(index, record.prompt)
            tokens = [*prompt, record.first_token]
            sampling = Sampling(max_tokens=record.output, ignore_eos=True)
            seq = self._sequence(index, SequenceKind.DECODE, tokens, sampling, (record.first_token,))
            seq.num_computed = len(prompt)
            if not worker.blocks.grow(seq.table, seq.num_computed):
                worker.blocks.release(seq.table)
                break
            worker.imports.popleft()
            worker.blocks.commit(seq.table, tokens, seq.num_computed)
            seq.count_prefix_hit = False
            seq.sink = (record, index, None)
            worker.live += 1
            worker.seqs.add(seq)
            worker.sched.add(seq)
            admitted = True
        if admitted:
            self._kick(worker, now)


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """`n` arrival times at `rate` per second. The same seed gives the same gaps scaled by 1/rate."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(1.0)
        out.append(t / rate)
    return out


@dataclass(frozen=True)
class Phase:
    """A stretch of a shifting workload: Poisson arrivals at `rate_rps`; lengths uniform in [lo, hi] tokens."""

    name: str
    duration_s: float
    rate_rps: float
    prompt_tokens: tuple[int, int]
    output_tokens: tuple[int, int]

    def describe(self) -> str:
        return (f"{self.name}: {self.duration_s:g} s at {self.rate_rps:g} req/s, prompts "
                f"{self.prompt_tokens[0]}-{self.prompt_tokens[1]} tokens, outputs "
                f"{self.output_tokens[0]}-{self.output_tokens[1]} tokens")


def shifting_trace(phases: Seq[Phase], seed: int) -> list[Record]:
    """One request trace through `phases` back to back: arrival times, lengths and the phase of each.

    A time-varying Poisson process: each phase draws its own arrivals and
    lengths, so the same seed gives every fleet the very same requests.
    """
    rng = random.Random(seed)
    out: list[Record] = []
    start = 0.0
    for number, phase in enumerate(phases):
        t = start + rng.expovariate(phase.rate_rps)
        while t < start + phase.duration_s:
            prompt = rng.randint(*phase.prompt_tokens)
            output = rng.randint(*phase.output_tokens)
            out.append(Record(t, prompt, output, phase=number))
            t += rng.expovariate(phase.rate_rps)
        start += phase.duration_s
    return out


@dataclass
class RunResult:
    rate: float
    attainment: float
    extra: dict[str, float] = field(default_factory=dict)
