"""One request's way through the fleet, driven over gRPC: the I/O around `router_svc.request_fsm`.

    choose (policy, suspects avoided, bounded wait for the view to change)
      -> Prefill on P -> first token to the client
      -> Decode on D with P's KV handle (or a local prefill) -> tokens as they come

Every decision (retry, migrate, release, give up) is `RequestLife`'s, a
state machine with no I/O; this module performs its actions (policy calls,
worker calls, the stall watch, background releases) and feeds back what
happened, with the time from `clock`.

Contract of `Pipeline.run(job)`: an async generator of lists of new token
ids, then one Outcome; it raises RouteFailure when the request cannot be
completed. Closing it early (aclose, or cancelling its task) cancels the
worker calls and releases a KV handle still held, in the background. Many
runs may share one Pipeline, on one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

import grpc

from router_svc.candidates import Candidate
from router_svc.live_view import LiveView
from router_svc.policy import NoCapacity, NoWorker, Policy, RouteRequest
from router_svc.request_events import (
    CLIENT_ERRORS,
    Action,
    CallDecode,
    CallPrefill,
    Cancelled,
    Choose,
    Chosen,
    Code,
    DecodeEnded,
    DecodeFailed,
    DecodeStepped,
    Emit,
    Fail,
    Finish,
    KvRef,
    Migrate,
    NoRoute,
    Outcome,
    PrefillAnswered,
    PrefillFailed,
    Release,
    Stalled,
    Suspect,
    Worker,
)
from router_svc.request_fsm import Phase, RequestLife
from router_svc.stall import StallWatch, Watched
from runtime.channels import ChannelPool
from runtime.peers import peer_identity
from runtime.sampling import Sampling, finish_reason_from_proto, sampling_to_proto
from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc

__all__ = ["Job", "Outcome", "Pipeline", "PipelineConfig", "RouteFailure", "Suspects"]

log = logging.getLogger(__name__)

# Seconds a finished decode stream gets to end by itself before the router cancels it.
FINISH_GRACE_S = 2.0


class RouteFailure(Exception):
    """The request cannot be completed: answer `code` with `message` (and a retry hint, if any)."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """The router's settings (RouterSettings owns their defaults and help) as the pipeline uses them."""

    # How long a request waits for a routable worker with room before it is refused.
    capacity_wait_s: float
    # Worker calls a request may make before the router gives up on it.
    max_attempts: int
    # A decode stream silent for this long is treated as a dead worker (SIGSTOP, partition).
    stall_timeout_s: float
    # A worker that failed a call is avoided by every request for this long
    # (its record lingers in etcd until its lease expires).
    suspect_s: float
    kv_transports: tuple[str, ...]
    # Not a router setting: a prefill that takes this long is a stuck worker, whatever the client allows.
    prefill_timeout_s: float = 120.0


@dataclass(frozen=True)
class Job:
    request_id: str
    model: str
    prompt: tuple[int, ...]
    sampling: Sampling
    # Absolute time.monotonic() deadline of the client, if any.
    deadline: float | None = None
    # Asked of the decode worker (DecodeRequest.flush_interval_ms): the router's stream interval for a
    # client that watches the stream; more for one that takes the whole answer at the end.
    flush_interval_ms: int = 0


class Suspects:
    """Workers that just failed a call, avoided by every request for a while."""

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self._until: dict[str, float] = {}

    def add(self, worker_id: str, now: float) -> None:
        self._until[worker_id] = now + self.hold_s

    def active(self, now: float) -> frozenset[str]:
        expired = [w for w, until in self._until.items() if until <= now]
        for worker_id in expired:
            del self._until[worker_id]
        return frozenset(self._until)


class Pipeline:
    def __init__(self, view: LiveView, policy: Policy, channels: ChannelPool, config: PipelineConfig, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.view = view
        self.policy = policy
        self.channels = channels
        self.config = config
        # The clock of Job.deadline and of every event fed to the request machines.
        self.clock = clock
        self.suspects = Suspects(config.suspect_s)
        self.stalls = StallWatch(config.stall_timeout_s)
        # KV releases and finishing decode calls in flight: the loop keeps only weak references to tasks.
        self._background: set[asyncio.Task[None]] = set()

    async def run(self, job: Job) -> AsyncGenerator[list[int] | Outcome, None]:
        """Yields lists of new token ids, then one Outcome. Raises RouteFailure."""
        life = RequestLife(job.request_id, now=self.clock(), deadline=job.deadline,
                           max_attempts=self.config.max_attempts, capacity_wait_s=self.config.capacity_wait_s,
                           prefill_timeout_s=self.config.prefill_timeout_s)
        sampling = sampling_to_proto(job.sampling)
        pending: deque[Action] = deque(life.start())
        try:
            while pending:
                action = pending.popleft()
                if isinstance(action, Emit):
                    yield list(action.tokens)
                elif isinstance(action, Finish):
                    yield action.outcome
                    return
                elif isinstance(action, Fail):
                    raise RouteFailure(grpc.StatusCode[action.code.value], action.message, action.retry_after_s)
                elif isinstance(action, Choose):
                    pending.extend(life.step(await self._choose(job, action)))
                elif isinstance(action, CallPrefill):
                    pending.extend(life.step(await self._prefill(job, sampling, action)))
                elif isinstance(action, CallDecode):
                    call = self._start_decode(job, sampling, action)
                    finished = False
                    try:
                        with self.stalls.watch(call) as watched:
                            # The machine leaves DECODING when this call has finished or failed.
                            while life.phase is Phase.DECODING:
                                event = await self._read_step(call, watched, action.worker)
                                finished = isinstance(event, DecodeStepped) and bool(event.finish_reason)
                                for out in life.step(event):
                                    if isinstance(out, Emit):
                                        yield list(out.tokens)
                                        watched.touch()  # time the client took is not the worker's silence
                                    else:
                                        pending.append(out)
                    finally:
                        if finished:
                            self._let_finish(call)
                        else:
                            call.cancel()
                else:
                    self._perform(action)
        finally:
            # Leaving early (the consumer closed us, the task was cancelled, a bug): free what the request holds.
            for action in life.step(Cancelled(self.clock())):
                self._perform(action)

    def _perform(self, action: Action) -> None:
        """The actions that need no answer: done now, without waiting."""
        if isinstance(action, Release):
            self._release_later(action.handle)
        elif isinstance(action, Suspect):
            self.suspects.add(action.worker_id, self.clock())
            if action.forget_load:
                self.view.loads.forget(action.worker_id)
        elif isinstance(action, Migrate):
            log.warning("decode stream lost (%s) after %d tokens; migrating", action.why, action.produced,
                        extra={"worker_id": action.worker_id})
        else:
            raise AssertionError(f"unexpected action {action!r}")

    async def _choose(self, job: Job, action: Choose) -> Chosen | NoRoute:
        """One policy decision (after waiting for a view change, when asked to)."""
        if action.wait_s > 0:
            await self.view.wait_changed(action.wait_s)
        now = self.clock()
        # The prompt's cached prefix per worker, from the workers' KV events (for policies that price it).
        cached = self.view.cached_prefix(job.model, job.prompt) if self.policy.uses_prefix_cache else None
        request = RouteRequest(model=job.model, prompt_tokens=len(job.prompt) + action.produced,
                               max_tokens=max(1, job.sampling.max_tokens - action.produced),
                               exclude=action.exclude, allow_remote_prefill=not action.local, cached=cached)
        fleet = self.view.fleet()
        suspects = self.suspects.active(now) - action.exclude
        try:
            decision = None
            if suspects:
                # A suspect is better than nothing: it may have recovered.
                with contextlib.suppress(NoWorker, NoCapacity):
                    decision = self.policy.choose(
                        dataclasses.replace(request, exclude=request.exclude | suspects), fleet, now)
            if decision is None:
                decision = self.policy.choose(request, fleet, now)
        except NoCapacity as exc:
            return NoRoute(now, str(exc), no_capacity=True, retry_after_s=exc.retry_after_s)
        except NoWorker as exc:
            return NoRoute(now, str(exc))
        prefill = None if decision.prefill is None else _worker(decision.prefill)
        return Chosen(self.clock(), _worker(decision.decode), prefill, decision.reason)

    async def _prefill(self, job: Job, sampling: common_pb2.SamplingParams,
                       action: CallPrefill) -> PrefillAnswered | PrefillFailed:
        stub = self.channels.stub(worker_pb2_grpc.PrefillStub, action.worker.endpoint, _identity(action.worker))
        try:
            reply = await stub.Prefill(worker_pb2.PrefillRequest(
                request_id=job.request_id, model=job.model, prompt_token_ids=job.prompt, sampling=sampling,
                kv_transports=_transports_for(self.config.kv_transports, action.consumer_transports),
                consumer_host=action.consumer_host),
                timeout=action.timeout_s)
        except grpc.aio.AioRpcError as exc:
            return PrefillFailed(self.clock(), self._failure_code(exc, action.worker), exc.details() or "")
        handle = None
        finish_reason = ""
        if reply.HasField("handle"):
            handle = KvRef(action.worker.endpoint, reply.handle.handle_id, reply.handle)
        else:
            finish_reason = finish_reason_from_proto(reply.finish_reason)
        return PrefillAnswered(self.clock(), reply.first_token_id, handle, finish_reason, queue_ms=reply.queue_ms,
                               prefill_ms=reply.prefill_ms, cached_prompt_tokens=reply.cached_prompt_tokens)

    def _start_decode(self, job: Job, sampling: common_pb2.SamplingParams,
                      action: CallDecode) -> grpc.aio.UnaryStreamCall:
        request = worker_pb2.DecodeRequest(request_id=job.request_id, model=job.model, prompt_token_ids=job.prompt,
                                           sampling=sampling, generated_token_ids=action.generated,
                                           flush_interval_ms=job.flush_interval_ms)
        if action.handle is not None:
            assert isinstance(action.handle.message, common_pb2.KvHandle) and action.first_token is not None
            request.handle.CopyFrom(action.handle.message)
            request.first_token_id = action.first_token
        stub = self.channels.stub(worker_pb2_grpc.DecodeStub, action.worker.endpoint, _identity(action.worker))
        return stub.Decode(request, timeout=action.timeout_s)

    async def _read_step(self, call: grpc.aio.UnaryStreamCall, watched: Watched,
                         worker: Worker) -> DecodeStepped | DecodeFailed | DecodeEnded | Stalled:
        """The next event of a decode stream."""
        try:
            step = await call.read()
        except asyncio.CancelledError:
            # The watchdog cancelled a silent call; a cancel of our own task is the client leaving.
            if watched.stalled and not _cancelled_here():
                return Stalled(self.clock())
            raise
        except grpc.aio.AioRpcError as exc:
            if watched.stalled and exc.code() == grpc.StatusCode.CANCELLED and not _cancelled_here():
                return Stalled(self.clock())
            return DecodeFailed(self.clock(), self._failure_code(exc, worker), exc.details() or "")
        watched.touch()
        if step is grpc.aio.EOF:
            return DecodeEnded(self.clock())
        return DecodeStepped(self.clock(), tuple(step.token_ids),
                             finish_reason_from_proto(step.finish_reason) if step.finish_reason else "",
                             kv_transfer_ms=step.kv_transfer_ms, prefill_ms=step.prefill_ms)

    def _failure_code(self, exc: grpc.aio.AioRpcError, worker: Worker) -> Code:
        """The failed call's status for the machine; a call cancelled because our task is cancelled re-raises."""
        code = exc.code()
        if code == grpc.StatusCode.CANCELLED and _cancelled_here():
            raise asyncio.CancelledError()
        if code == grpc.StatusCode.UNAVAILABLE:
            # A worker whose certificate does not name its record: counted, and a suspect like any UNAVAILABLE.
            self.channels.note_failure(worker.endpoint, _identity(worker), exc.details() or "")
        if Code(code.name) not in CLIENT_ERRORS:
            log.warning("worker call failed", extra={"worker_id": worker.worker_id, "code": code.name,
                                                     "details": exc.details()})
        return Code(code.name)

    def _let_finish(self, call: grpc.aio.UnaryStreamCall) -> None:
        """Lets a decode call that sent its last step end on its own, in the background.

        Cancelling it at once would race the worker's return, and the worker
        would count a completed request as CANCELLED. One that does not end
        within FINISH_GRACE_S is cancelled.
        """
        if call.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no running loop: nothing can wait for it
            call.cancel()
            return
        # A timer and a callback, not a task per request: this runs for every request the router serves.
        deadline = loop.call_later(FINISH_GRACE_S, call.cancel)
        call.add_done_callback(lambda _: deadline.cancel())

    def _release_later(self, handle: KvRef) -> None:
        """Frees an unused KV handle now rather than at its TTL (best effort, in the background)."""
        stub = worker_pb2_grpc.KvSourceStub(self.channels.get(handle.endpoint))

        async def release() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.TimeoutError):
                await stub.Release(worker_pb2.KvReleaseRequest(handle_id=handle.handle_id), timeout=2)

        with contextlib.suppress(RuntimeError):  # no running loop: the handle's TTL frees it
            task = asyncio.get_running_loop().create_task(release(), name=f"kv-release-{handle.handle_id}")
            self._background.add(task)
            task.add_done_callback(self._background.discard)


def _worker(candidate: Candidate) -> Worker:
    return Worker(candidate.worker_id, candidate.endpoint, candidate.host, candidate.kv_transports, candidate.node)


def _identity(worker: Worker) -> str:
    """The name the worker's certificate must carry (checked when --peer-verify-identity is on)."""
    return peer_identity(worker.worker_id, worker.node)


def _transports_for(preference: tuple[str, ...], consumer: tuple[str, ...]) -> list[str]:
    """The router's transports, best first, that the decode worker accepts (it refuses any other).

    When none is shared (or the consumer's list is unknown) the router's own list goes: the decode
    worker then refuses the handle and the request falls back to prefilling on it.
    """
    shared = [t for t in preference if t in consumer]
    return shared or list(preference)


def _cancelled_here() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
