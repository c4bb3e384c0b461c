"""One request's way through the fleet: pick a pair, prefill, move the KV, decode, survive failures.

    choose (policy, bounded wait for capacity)
      -> Prefill on P (fails: exclude P, choose again: another P or local)
      -> first token to the client
      -> Decode on D with P's KV handle
           fails before its first step: exclude D, the handle is reused on another D
           fails mid-stream (or the handle is gone): migrate — a new D rebuilds the
           KV of prompt + tokens already sent (local prefill) and continues after them
      -> tokens to the client as they come; the last step carries finish_reason

The client never sees a lost or repeated token: `generated` holds exactly
what was yielded, and every new decode continues after it. Client errors
(INVALID_ARGUMENT...) are not retried. Cancellation (the consumer closes the
generator, or the task is cancelled) cancels the worker calls and releases
an unused KV handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

import grpc

from router_svc.live_view import LiveView
from router_svc.policy import Decision, NoCapacity, NoWorker, Policy, RouteRequest
from router_svc.stall import StallWatch
from runtime.channels import ChannelPool
from runtime.sampling import Sampling, finish_reason_from_proto, sampling_to_proto
from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

# Statuses that mean "this request is wrong", not "this worker is in trouble".
CLIENT_ERRORS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE})


class RouteFailure(Exception):
    """The request cannot be completed: answer `code` with `message` (and a retry hint, if any)."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class PipelineConfig:
    # How long a request waits for a routable worker with room before it is refused.
    capacity_wait_s: float = 5.0
    # Worker calls a request may make before the router gives up on it.
    max_attempts: int = 8
    prefill_timeout_s: float = 120.0
    # A decode stream silent for this long is treated as a dead worker (SIGSTOP, partition).
    stall_timeout_s: float = 30.0
    # A worker that failed a call is avoided by every request for this long
    # (its record lingers in etcd until its lease expires).
    suspect_s: float = 5.0
    kv_transports: tuple[str, ...] = ("shm", "tcp", "grpc")


@dataclass(frozen=True)
class Job:
    request_id: str
    model: str
    prompt: tuple[int, ...]
    sampling: Sampling
    # Absolute time.monotonic() deadline of the client, if any.
    deadline: float | None = None


@dataclass
class Outcome:
    """What the last response carries besides tokens."""

    finish_reason: str
    prefill_worker_id: str = ""
    decode_worker_id: str = ""
    local_prefill: bool = False
    reason: str = ""
    migrations: int = 0
    retries: int = 0
    cached_prompt_tokens: int = 0
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    kv_transfer_ms: float = 0.0
    ttft_ms: float = 0.0
    decode_ms: float = 0.0
    e2e_ms: float = 0.0
    completion_tokens: int = 0
    token_times: list[float] = field(default_factory=list, repr=False)

    @property
    def mean_inter_token_ms(self) -> float:
        if len(self.token_times) < 2:
            return 0.0
        return (self.token_times[-1] - self.token_times[0]) * 1000 / (len(self.token_times) - 1)


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
    def __init__(self, view: LiveView, policy: Policy, channels: ChannelPool, config: PipelineConfig) -> None:
        self.view = view
        self.policy = policy
        self.channels = channels
        self.config = config
        self.suspects = Suspects(config.suspect_s)
        self.stalls = StallWatch(config.stall_timeout_s)

    def _remaining(self, job: Job) -> float | None:
        return None if job.deadline is None else max(0.001, job.deadline - time.monotonic())

    async def _choose(self, job: Job, exclude: set[str], *, local: bool, produced: int) -> Decision:
        """A pair for `job`, waiting up to capacity_wait_s for one; RouteFailure when none comes."""
        start = time.monotonic()
        wait_until = start + self.config.capacity_wait_s
        if job.deadline is not None:
            wait_until = min(wait_until, job.deadline)
        request = RouteRequest(model=job.model, prompt_tokens=len(job.prompt) + produced,
                               max_tokens=max(1, job.sampling.max_tokens - produced),
                               exclude=frozenset(exclude), allow_remote_prefill=not local)
        while True:
            now = time.monotonic()
            fleet = self.view.fleet()
            suspects = self.suspects.active(now) - exclude
            try:
                if suspects:
                    try:
                        return self.policy.choose(
                            dataclasses.replace(request, exclude=request.exclude | suspects), fleet, now)
                    except (NoWorker, NoCapacity):
                        pass  # a suspect is better than nothing: it may have recovered
                return self.policy.choose(request, fleet, now)
            except NoCapacity as exc:
                if now >= wait_until:
                    raise RouteFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), exc.retry_after_s) from None
            except NoWorker as exc:
                if now >= wait_until:
                    raise RouteFailure(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
            await self.view.wait_changed(min(0.05, max(0.001, wait_until - now)))

    def _failed(self, worker_id: str, exc: grpc.aio.AioRpcError, exclude: set[str]) -> None:
        """Books a worker failure; re-raises errors that are the client's, not the worker's."""
        code = exc.code()
        if code in CLIENT_ERRORS:
            raise RouteFailure(code, exc.details() or code.name)
        if code == grpc.StatusCode.CANCELLED and self._cancelled_here():
            raise asyncio.CancelledError()
        exclude.add(worker_id)
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL,
                    grpc.StatusCode.UNKNOWN):
            self.suspects.add(worker_id, time.monotonic())
            self.view.loads.forget(worker_id)
        log.warning("worker call failed; trying elsewhere",
                    extra={"worker_id": worker_id, "code": code.name, "details": exc.details()})

    @staticmethod
    def _cancelled_here() -> bool:
        task = asyncio.current_task()
        return task is not None and task.cancelling() > 0

    async def run(self, job: Job) -> AsyncGenerator[list[int] | Outcome, None]:
        """Yields lists of new token ids, then one Outcome. Raises RouteFailure."""
        arrived = time.monotonic()
        outcome = Outcome(finish_reason="")
        generated: list[int] = []
        exclude: set[str] = set()
        handle: common_pb2.KvHandle | None = None
        handle_owner = ""
        attempts = 0
        sampling = sampling_to_proto(job.sampling)
        try:
            while not outcome.finish_reason:
                if attempts >= self.config.max_attempts:
                    raise RouteFailure(grpc.StatusCode.UNAVAILABLE,
                                       f"request {job.request_id} failed on {attempts} workers; giving up "
                                       f"(tried: {', '.join(sorted(exclude)) or 'none'})")
                attempts += 1
                decision = await self._choose(job, exclude, local=bool(generated) and handle is None,
                                              produced=len(generated))
                decode = decision.decode
                if not outcome.queue_ms:
                    outcome.queue_ms = (time.monotonic() - arrived) * 1000
                outcome.reason = decision.reason
                if handle is None and not generated and decision.prefill is not None:
                    prefill = decision.prefill
                    try:
                        reply = await worker_pb2_grpc.PrefillStub(self.channels.get(prefill.endpoint)).Prefill(
                            worker_pb2.PrefillRequest(
                                request_id=job.request_id, model=job.model, prompt_token_ids=job.prompt,
                                sampling=sampling, kv_transports=list(self.config.kv_transports),
                                consumer_host=decode.host),
                            timeout=min(self._remaining(job) or self.config.prefill_timeout_s,
                                        self.config.prefill_timeout_s))
                    except grpc.aio.AioRpcError as exc:
                        self._failed(prefill.worker_id, exc, exclude)
                        outcome.retries += 1
                        continue
                    outcome.prefill_worker_id = prefill.worker_id
                    outcome.local_prefill = False
                    outcome.queue_ms += reply.queue_ms
                    outcome.prefill_ms = reply.prefill_ms
                    outcome.cached_prompt_tokens = reply.cached_prompt_tokens
                    generated.append(reply.first_token_id)
                    outcome.token_times.append(time.monotonic())
                    outcome.ttft_ms = (time.monotonic() - arrived) * 1000
                    yield [reply.first_token_id]
                    if not reply.HasField("handle"):
                        outcome.finish_reason = finish_reason_from_proto(reply.finish_reason)
                        break
                    handle, handle_owner = reply.handle, prefill.endpoint

                request = worker_pb2.DecodeRequest(request_id=job.request_id, model=job.model,
                                                   prompt_token_ids=job.prompt, sampling=sampling)
                if handle is not None:
                    request.handle.CopyFrom(handle)
                    request.first_token_id = generated[0]
                else:
                    request.generated_token_ids.extend(generated)
                    outcome.local_prefill = True
                    outcome.prefill_worker_id = ""
                outcome.decode_worker_id = decode.worker_id
                call = worker_pb2_grpc.DecodeStub(self.channels.get(decode.endpoint)).Decode(
                    request, timeout=self._remaining(job))
                stepped = False
                try:
                    with self.stalls.watch(call) as watched:
                        while True:
                            try:
                                step = await call.read()
                            except asyncio.CancelledError:
                                if watched.stalled and not self._cancelled_here():
                                    raise TimeoutError from None
                                raise
                            watched.touch()
                            if step is grpc.aio.EOF:
                                break
                            if not stepped:
                                stepped = True
                                handle = None  # the decode worker has the KV now
                                outcome.kv_transfer_ms += step.kv_transfer_ms
                                if outcome.local_prefill:
                                    outcome.prefill_ms = step.prefill_ms
                            if step.token_ids:
                                now = time.monotonic()
                                if not generated:
                                    outcome.ttft_ms = (now - arrived) * 1000
                                generated.extend(step.token_ids)
                                outcome.token_times.extend([now] * len(step.token_ids))
                                yield list(step.token_ids)
                                watched.touch()  # time the client took is not the worker's silence
                            if step.finish_reason:
                                outcome.finish_reason = finish_reason_from_proto(step.finish_reason)
                                break
                    if not outcome.finish_reason:
                        raise _stream_ended(decode.worker_id)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION) and \
                            handle is not None:
                        # The handle expired or does not fit this worker: rebuild the KV locally instead.
                        log.warning("KV handle unusable on %s (%s); prefilling locally", decode.worker_id,
                                    exc.code().name)
                        if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                            exclude.add(decode.worker_id)
                        handle = None
                    else:
                        self._failed(decode.worker_id, exc, exclude)
                    if stepped:
                        outcome.migrations += 1
                    else:
                        outcome.retries += 1
                    continue
                except TimeoutError:
                    log.warning("decode stream stalled; migrating", extra={"worker_id": decode.worker_id})
                    exclude.add(decode.worker_id)
                    self.suspects.add(decode.worker_id, time.monotonic())
                    outcome.migrations += 1
                    continue
                finally:
                    call.cancel()
        finally:
            if handle is not None:
                self._release_later(handle_owner, handle)
        end = time.monotonic()
        outcome.completion_tokens = len(generated)
        outcome.e2e_ms = (end - arrived) * 1000
        if outcome.token_times:
            outcome.decode_ms = (outcome.token_times[-1] - outcome.token_times[0]) * 1000
        yield outcome

    def _release_later(self, endpoint: str, handle: common_pb2.KvHandle) -> None:
        """Frees an unused KV handle now rather than at its TTL (best effort, in the background)."""
        stub = worker_pb2_grpc.KvSourceStub(self.channels.get(endpoint))

        async def release() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.TimeoutError):
                await stub.Release(worker_pb2.KvReleaseRequest(handle_id=handle.handle_id), timeout=2)

        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().create_task(release())


def _stream_ended(worker_id: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                details=f"decode stream from {worker_id} ended without a finish reason")
