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

Not a benchmark by itself (running it does nothing; `make bench` should skip bench/_*.py).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from engine.base import Sampling
from engine.sim import GpuSet, ModelProfile, RooflineParams, kv_capacity_blocks, step_seconds
from engine.sim.blocks import BlockManager
from engine.sim.scheduler import Produced, Scheduler
from engine.sim.sequence import Sequence, SequenceKind, StopRules
from engine.sim.tokens import TokenStream
from router_svc.candidates import Candidate, FleetView, Load, Role, make_candidate
from router_svc.costmodel import ModelShape
from router_svc.policy import NoCapacity, NoWorker, Policy, RouteRequest

BLOCK_SIZE = 16
_FILLER = [1000 + (i * 7919) % 100000 for i in range(32768)]


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
    arrival: float
    prompt: int
    output: int
    first_at: float | None = None
    last_at: float | None = None
    tokens: int = 0
    first_token: int = 0
    done: bool = False

    def ok(self, w: Workload) -> bool:
        if not self.done or self.first_at is None or self.last_at is None:
            return False
        tpot = (self.last_at - self.first_at) / (self.tokens - 1) if self.tokens > 1 else 0.0
        return self.first_at - self.arrival <= w.ttft_slo_s and tpot <= w.tpot_slo_s


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

    def candidate(self, model: str, now: float) -> Candidate:
        s = self.spec
        load = Load(queued_prefill_tokens=self.sched.queued_prefill_tokens, active_requests=self.live,
                    active_sequences=self.sched.num_holding_kv, kv_blocks_used=self.blocks.num_used,
                    kv_blocks_total=self.blocks.num_blocks, kv_block_size=BLOCK_SIZE, max_batch_size=s.max_batch,
                    received_at=now)
        return make_candidate(worker_id=s.worker_id, role=s.role, model=model, endpoint=s.worker_id, load=load,
                              host=s.host, gpu_type=s.gpus.gpu.catalog_id, gpu_count=s.gpus.count,
                              kv_blocks_total=self.blocks.num_blocks, kv_block_size=BLOCK_SIZE,
                              max_batch_size=s.max_batch)


def model_shape(profile: ModelProfile) -> ModelShape:
    """The router cost model's view of a sim profile."""
    return ModelShape(params=profile.active_params, kv_bytes_per_token=profile.kv_bytes_per_token,
                      bytes_per_param=profile.weight_bytes / profile.total_params)


class FleetSim:
    """One run: `arrivals` (seconds, ascending) through `specs`. Use once: `run()` then read `records`."""

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
            if kind == "arrive":
                assert isinstance(payload, int)
                self._route(self.records[payload], payload, now)
            elif kind == "step":
                assert isinstance(payload, str)
                self._step_done(self.workers[payload], now)
            else:
                assert isinstance(payload, tuple)
                self._import(payload[0], payload[1], payload[2], now)
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

    def _push(self, t: float, kind: str, payload: object) -> None:
        heapq.heappush(self._events, (t, next(self._order), kind, payload))

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
        stream = TokenStream(self.profile.fingerprint, tokens, seed=None, ignore_eos=True)
        rules = StopRules(sampling, self.profile.max_context_tokens, delivered)
        return Sequence(f"r{index}", kind, tokens, stream, rules, arrived_at=0.0)

    def _admit(self, worker: _Worker, seq: Sequence, now: float) -> None:
        worker.live += 1
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
            self._retry_backlog(now)
        self._kick(worker, now)

    def _deliver(self, worker: _Worker, produced: Produced, now: float) -> bool:
        """Books one produced token; True when it ended a sequence here (blocks were freed)."""
        record, index, decode = produced.seq.sink
        if produced.seq.kind is SequenceKind.PREFILL:
            worker.live -= 1
            record.first_at, record.tokens, record.first_token = now, 1, produced.token
            nbytes = record.prompt * self.profile.kv_bytes_per_token
            rate = self.same_host_rate if decode.spec.host == worker.spec.host else self.cross_host_rate
            self._push(now + nbytes / rate, "import", (record, index, decode))
            return True
        if record.first_at is None:
            record.first_at = now
        record.tokens += 1
        record.last_at = now
        if produced.finish_reason is not None:
            record.done = True
            worker.live -= 1
            self._newly_settled.append(index)
            return True
        return False

    def _import(self, record: Record, index: int, worker: _Worker, now: float) -> None:
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


@dataclass
class RunResult:
    rate: float
    attainment: float
    extra: dict[str, float] = field(default_factory=dict)
