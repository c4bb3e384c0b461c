"""SimEngine: the Engine interface on a roofline clock, for scale and policy work.

No model math. One asyncio task per engine runs the steps the scheduler
plans, sleeping each step's roofline time divided by `speedup`; requests
wait on futures and queues, so an idle engine costs nothing and hundreds fit
one process. Never imports torch.

Settings used from EngineConfig: model (a profile id), gpu_type, gpu_count,
max_batch_size, max_context_tokens, kv_blocks, kv_block_size, speedup, and
the "sim_*" keys of extra (see engine/sim/settings.py). device and dtype are
ignored: the KV dtype is the profile's.

Durations reported (queue_s, prefill_s) are seconds on this process's
clock, i.e. simulated seconds divided by speedup.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable

from engine.base import (
    CapacityExhausted,
    DecodeRequest,
    Engine,
    EngineConfig,
    EngineError,
    EngineStats,
    InvalidRequest,
    KvBlob,
    KvLayoutSpec,
    KvMismatch,
    ModelShape,
    PrefillRequest,
    PrefillResult,
    Sampling,
)
from engine.byte_tokenizer import ByteTokenizer
from engine.kv_events import KvEventLog
from engine.sim.blocks import BlockManager
from engine.sim.decode_stream import DecodeStream, Sink
from engine.sim.profiles import ModelProfile, get_profile
from engine.sim.roofline import GpuSet, StepTimer, gpu_set, kv_capacity_blocks
from engine.sim.scheduler import Produced, Scheduler
from engine.sim.sequence import Sequence, SequenceKind, StopRules
from engine.sim.settings import SimSettings
from engine.sim.tokens import TokenStream, kv_payload, payload_tokens
from runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

# How far behind its clock the step loop may run before it stops catching up
# (seconds): an event loop stalled by other work does not cause a burst.
_MAX_LAG_S = 0.05


class SimEngine(Engine):
    """See the module docstring. `clock` and `sleep` may be replaced to run on virtual time."""

    name = "sim"

    def __init__(
        self, config: EngineConfig, *, clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self._config = config
        self._clock = clock
        self._sleep = sleep
        self._tokenizer = ByteTokenizer()
        self._wake = asyncio.Event()
        self._live: set[Sequence] = set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._started = False
        self._failure: EngineError | None = None

    # -- lifecycle --------------------------------------------------------

    async def start(self) -> None:
        """Resolves profile, GPUs and settings, sizes the KV cache, starts the step loop. Called once."""
        if self._started or self._closed:
            raise EngineError("start() may be called once, before close()")
        cfg = self._config
        self.settings = SimSettings.from_extra(cfg.extra)
        self.profile: ModelProfile = get_profile(cfg.model)
        self.gpus: GpuSet = gpu_set(cfg.gpu_type, cfg.gpu_count)
        if not (cfg.speedup > 0 and math.isfinite(cfg.speedup)):
            raise EngineError(f"speedup must be a positive number, got {cfg.speedup}")
        if cfg.max_batch_size < 1:
            raise EngineError(f"max_batch_size must be >= 1, got {cfg.max_batch_size}")
        if not 0 <= cfg.max_context_tokens <= self.profile.max_context_tokens:
            raise EngineError(
                f"max_context_tokens must be 0..{self.profile.max_context_tokens} for {self.profile.profile_id}"
                f" (0: the model's limit), got {cfg.max_context_tokens}"
            )
        fit = kv_capacity_blocks(self.gpus, self.profile, cfg.kv_block_size, self.settings.roofline)
        if not 0 <= cfg.kv_blocks <= fit:
            raise EngineError(
                f"kv_blocks must be 0..{fit} for {self.profile.profile_id} on {self.gpus.describe()}"
                f" (0: all that fit), got {cfg.kv_blocks}"
            )
        num_blocks = cfg.kv_blocks or fit
        self._blocks = BlockManager(num_blocks, cfg.kv_block_size)
        self._sched = Scheduler(self._blocks, cfg.max_batch_size, self.settings.max_step_tokens)
        self._timer = StepTimer(self.gpus, self.profile, self.settings.roofline)
        limit = cfg.max_context_tokens or self.profile.max_context_tokens
        self._max_context = min(limit, num_blocks * cfg.kv_block_size)
        self._layout = KvLayoutSpec(
            model_fingerprint=self.profile.fingerprint, num_layers=self.profile.num_layers,
            num_kv_heads=self.profile.num_kv_heads, head_dim=self.profile.head_dim, dtype=self.profile.kv_dtype,
            block_size=cfg.kv_block_size,
        )
        self._started = True
        self._task = asyncio.create_task(self._run(), name=f"sim-steps-{cfg.name}")
        log.info(
            "sim engine started: %s on %s, %d KV blocks of %d tokens, max batch %d, speedup %g",
            self.profile.profile_id, self.gpus.describe(), num_blocks, cfg.kv_block_size, cfg.max_batch_size,
            cfg.speedup,
        )

    async def close(self) -> None:
        """Stops the step loop and ends every request with EngineError. Safe to call twice, or before start()."""
        if self._closed:
            return
        self._closed = True
        await cancel_and_wait(self._task)
        self._fail_all(EngineError("the engine was closed"))

    # -- properties -------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self._config.name

    @property
    def layout(self) -> KvLayoutSpec:
        self._check_started()
        return self._layout

    @property
    def model_shape(self) -> ModelShape:
        """The profile's shape (see ModelProfile.model_shape)."""
        self._check_started()
        return self.profile.model_shape()

    @property
    def tokenizer(self) -> ByteTokenizer:
        return self._tokenizer

    @property
    def max_context_tokens(self) -> int:
        self._check_started()
        return self._max_context

    def kv_events(self) -> KvEventLog | None:
        """The prefix cache's events (runtime.prefix_hash hashes of kv_block_size-token blocks); None before start()."""
        return self._blocks.events if self._started else None

    def describe(self) -> list[str]:
        """Model, GPUs and every assumption, one per line, for benchmark output."""
        self._check_started()
        return [self.profile.describe(), f"gpus: {self.gpus.describe()}", *self.settings.describe()]

    def stats(self) -> EngineStats:
        """A snapshot; cheap, never blocks. Zeros before start()."""
        if not self._started:
            return EngineStats()
        return EngineStats(
            queued_prefill_tokens=self._sched.queued_prefill_tokens,
            active_requests=len(self._live),
            active_sequences=self._sched.num_holding_kv,
            kv_blocks_used=self._blocks.num_used,
            kv_blocks_total=self._blocks.num_blocks,
            kv_block_size=self._blocks.block_size,
            max_batch_size=self._sched.max_batch,
            prefix_cache_hit_rate=self._blocks.hit_rate,
        )

    # -- work -------------------------------------------------------------

    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        """Queues the prompt (FIFO, one prompt per step) and returns its first token and KV.

        Cancelling the caller drops the request and its blocks.
        """
        self._check_running()
        prompt = self._check_prompt(request.prompt)
        seq = self._sequence(request.request_id, SequenceKind.PREFILL, list(prompt), request.sampling, delivered=())
        future: asyncio.Future[Produced] = asyncio.get_running_loop().create_future()

        def sink(item: Produced | BaseException) -> None:
            if future.done():
                return
            if isinstance(item, BaseException):
                future.set_exception(item)
            else:
                future.set_result(item)

        seq.sink = sink
        self._admit(seq)
        try:
            produced = await future
        finally:
            self._retire(seq)
        kv = None if produced.finish_reason is not None else self._export(prompt)
        scheduled = seq.scheduled_at if seq.scheduled_at is not None else seq.arrived_at
        done = seq.finished_at if seq.finished_at is not None else scheduled
        return PrefillResult(
            first_token=produced.token, kv=kv, finish_reason=produced.finish_reason,
            cached_tokens=seq.cached_tokens, queue_s=scheduled - seq.arrived_at, prefill_s=done - scheduled,
        )

    def decode(self, request: DecodeRequest) -> DecodeStream:
        """Streams the sequence's tokens, one step's worth per item; closing the iterator frees its KV at once.

        The first step raises InvalidRequest, KvMismatch (a blob of another
        layout or other tokens), or CapacityExhausted (no KV blocks for its
        context now). See engine.sim.decode_stream for reading it without a task.
        """
        return DecodeStream(lambda sink: self._begin_decode(request, sink), self._retire, self._first_step_times)

    # -- internals --------------------------------------------------------

    def _check_started(self) -> None:
        if not self._started:
            raise EngineError("the sim engine is not started")

    def _check_running(self) -> None:
        self._check_started()
        if self._closed:
            raise EngineError("the engine was closed")
        if self._failure is not None:
            raise self._failure

    def _check_prompt(self, prompt: tuple[int, ...]) -> tuple[int, ...]:
        if not prompt:
            raise InvalidRequest("prompt must not be empty")
        self._check_ids(prompt, "prompt")
        if len(prompt) >= self._max_context:
            raise InvalidRequest(
                f"prompt has {len(prompt)} tokens; this worker's context limit is {self._max_context}"
                " and leaves no room for output"
            )
        return prompt

    def _check_ids(self, tokens: tuple[int, ...], name: str) -> None:
        vocab = self.profile.vocab_size
        if tokens and (min(tokens) < 0 or max(tokens) >= vocab):
            bad = next(t for t in tokens if not 0 <= t < vocab)
            raise InvalidRequest(f"{name} token ids must be 0..{vocab - 1}, got {bad}")

    def _sequence(
        self, request_id: str, kind: SequenceKind, tokens: list[int], sampling: Sampling, delivered: tuple[int, ...]
    ) -> Sequence:
        seed: int | None = None
        if not sampling.greedy and sampling.top_k != 1:
            seed = sampling.seed if sampling.seed is not None else random.getrandbits(64)
        stream = TokenStream(
            self.profile.fingerprint, tokens, seed=seed, eos_rate=self.settings.eos_rate,
            ignore_eos=sampling.ignore_eos,
        )
        rules = StopRules(sampling, self._max_context, delivered)
        return Sequence(request_id, kind, tokens, stream, rules, arrived_at=self._clock())

    def _begin_decode(self, request: DecodeRequest, sink: Sink) -> tuple[Sequence, str | None]:
        """A decode stream's start: its sequence, queued unless a finish reason says nothing may be generated."""
        self._check_running()
        seq = self._decode_sequence(request)
        seq.sink = sink
        reason = seq.rules.before_start(len(seq.tokens))
        if reason is None:
            self._admit(seq)
        return seq, reason

    def _decode_sequence(self, request: DecodeRequest) -> Sequence:
        """Validates `request`, imports its KV (blocks taken now) and builds its sequence."""
        prompt = self._check_prompt(request.prompt)
        self._check_ids(request.generated, "generated")
        if request.first_token is not None:
            self._check_ids((request.first_token,), "first_token")
        context = [*prompt, *request.generated]
        delivered = request.generated if request.first_token is None else (*request.generated, request.first_token)
        tokens = [*prompt, *delivered]
        seq = self._sequence(request.request_id, SequenceKind.DECODE, tokens, request.sampling, delivered)
        blob = request.kv
        if blob is None:
            need = self._blocks.blocks_for(min(len(tokens) + 1, self._max_context))
            if need > self._blocks.num_available:
                raise CapacityExhausted(
                    f"no KV blocks for a {len(tokens)}-token context: {need} needed, "
                    f"{self._blocks.num_available} of {self._blocks.num_blocks} free"
                )
            return seq
        self._layout.check_compatible(blob.layout)
        if not 1 <= blob.num_tokens <= len(context):
            raise KvMismatch(f"KV blob covers {blob.num_tokens} tokens; the request's context has {len(context)}")
        covered = payload_tokens(blob.data)
        if len(covered) != blob.num_tokens or list(covered) != context[: blob.num_tokens]:
            raise KvMismatch("the KV blob covers other tokens than the request's prompt")
        seq.count_prefix_hit = False
        shared = self._blocks.share_prefix(seq.table, tokens)
        seq.num_computed = max(shared, min(blob.num_tokens, len(tokens) - 1))
        if not self._blocks.grow(seq.table, seq.num_computed):
            self._blocks.release(seq.table)
            raise CapacityExhausted(
                f"no KV blocks to import {blob.num_tokens} tokens: {self._blocks.blocks_for(seq.num_computed)} "
                f"needed, {self._blocks.num_available} of {self._blocks.num_blocks} free"
            )
        self._blocks.commit(seq.table, tokens, seq.num_computed)
        return seq

    def _export(self, prompt: tuple[int, ...]) -> KvBlob:
        nbytes = len(prompt) * self.profile.kv_bytes_per_token
        real = self.settings.kv_bytes == "real"
        return KvBlob(
            layout=self._layout, num_tokens=len(prompt), data=kv_payload(prompt, nbytes if real else 0),
            params={"simulated_nbytes": str(nbytes), "sim_payload": self.settings.kv_bytes},
        )

    def _first_step_times(self, seq: Sequence) -> tuple[float, float]:
        now = self._clock()
        scheduled = seq.scheduled_at if seq.scheduled_at is not None else now
        prefill = now - seq.prefill_started_at if seq.prefill_started_at is not None else 0.0
        return scheduled - seq.arrived_at, prefill

    def _admit(self, seq: Sequence) -> None:
        self._live.add(seq)
        self._sched.add(seq)
        self._wake.set()

    def _retire(self, seq: Sequence) -> None:
        """Ends `seq` here whatever happened to its caller; frees its blocks. Safe to call twice."""
        if self._started:
            self._sched.abort(seq)
        self._live.discard(seq)
        # Freed blocks may unblock a queued prompt.
        self._wake.set()

    def _fail_all(self, error: BaseException) -> None:
        for seq in list(self._live):
            if seq.sink is not None:
                seq.sink(error)
            self._sched.abort(seq)

    async def _run(self) -> None:
        """The step loop: plan, sleep the roofline time, apply, deliver. Ends only by cancellation."""
        deadline: float | None = None
        speedup = self._config.speedup
        try:
            while True:
                now = self._clock()
                plan = self._sched.schedule(now)
                if not plan:
                    self._wake.clear()
                    await self._wake.wait()
                    deadline = None
                    continue
                seconds = self._timer.seconds([(new, cached) for _, new, cached in plan]) / speedup
                # Steps follow each other on the simulated clock: time spent
                # here in Python, or a late wake-up, is absorbed by the next
                # sleep instead of adding up.
                start = now if deadline is None else max(deadline, now - _MAX_LAG_S)
                deadline = start + seconds
                await self._sleep(max(0.0, deadline - self._clock()))
                for produced in self._sched.complete(plan, self._clock()):
                    produced.seq.sink(produced)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A bug, not a load condition: fail every request loudly rather
            # than leave callers waiting on a loop that is gone.
            log.exception("sim step loop failed")
            self._failure = EngineError(f"the sim step loop failed: {exc!r}")
            self._fail_all(self._failure)
