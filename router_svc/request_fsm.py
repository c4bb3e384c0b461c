"""One request's life in the router as a state machine with no I/O: events in, actions out.

    life = RequestLife("r1", now=t0, max_attempts=8, capacity_wait_s=5, prefill_timeout_s=120)
    actions = life.start()                   # [Choose(...)]
    actions = life.step(Chosen(now, d, p))   # [CallPrefill(p, ...)]
    ...                                      # until Finish or Fail

Contract, in the manner of h11 and raft's `Ready()`: the machine never
touches a socket, a clock, asyncio or etcd; every event carries `now`, and
`step()` returns the actions to perform, in order. One machine serves one
request from one task. It is `done` after it returns Finish or Fail, or
after a Cancelled or DeadlinePassed event; those two are safe to feed again
(no actions), any other event out of turn raises ProtocolError.

What it promises:
- No lost or repeated token: Emit carries exactly the tokens of each answer,
  and every new decode continues after all the tokens emitted so far.
- No KV handle left to its TTL: the handle the machine holds is either taken
  over by a decode worker (its first step: the worker pulled and released
  it) or released with a Release action in the same step that drops it:
  refused by a decode worker, cancel, deadline, failure, max attempts.
- Client errors (INVALID_ARGUMENT, OUT_OF_RANGE) are answered, never retried.
- A worker that fails with UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL or
  UNKNOWN becomes a suspect and its load is forgotten; any failed worker is
  excluded for the rest of this request.
- A failure at or after the client's deadline is the deadline's doing: it
  ends the request with DEADLINE_EXCEEDED and blames no worker.
- No pair: wait for the view to change until capacity_wait_s (or the
  deadline) runs out, then RESOURCE_EXHAUSTED with the policy's retry hint
  when workers were only full, UNAVAILABLE when none could serve.
"""

from __future__ import annotations

import enum

from router_svc.request_events import (
    CLIENT_ERRORS,
    HANDLE_REFUSED,
    WORKER_DOWN,
    Action,
    CallDecode,
    CallPrefill,
    Cancelled,
    Choose,
    Chosen,
    Code,
    DeadlinePassed,
    DecodeEnded,
    DecodeFailed,
    DecodeStepped,
    Emit,
    Event,
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
)

# How long one wait for a view change lasts before the policy is asked again.
_VIEW_POLL_S = 0.05
# Retry hint when workers refused a request as full and the policy gave none (seconds).
FULL_RETRY_S = 1.0
# The shortest timeout handed to a worker call, so that a deadline about to pass is not sent as 0 (no deadline).
_MIN_TIMEOUT_S = 0.001


class ProtocolError(RuntimeError):
    """An event the machine cannot take in its current phase: a bug in the driver."""


class Phase(enum.Enum):
    NEW = "new"
    CHOOSING = "choosing"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    DONE = "done"


class RequestLife:
    """The state of one request between the router's client and its workers. Not thread-safe."""

    def __init__(self, request_id: str, *, now: float, max_attempts: int, capacity_wait_s: float,
                 prefill_timeout_s: float, deadline: float | None = None) -> None:
        self.request_id = request_id
        self.max_attempts = max_attempts
        self.capacity_wait_s = capacity_wait_s
        self.prefill_timeout_s = prefill_timeout_s
        self.deadline = deadline
        self.phase = Phase.NEW
        self.outcome = Outcome(finish_reason="")
        self.attempts = 0
        # Exactly the tokens emitted so far: every new decode continues after them.
        self.generated: list[int] = []
        self.exclude: set[str] = set()
        # Workers that refused this request as full (RESOURCE_EXHAUSTED): if no other can take it, the
        # answer is "full, retry", not "no worker".
        self._refused_full = 0
        self._arrived = now
        self._queued = False
        self._wait_until = now
        self._pair: Chosen | None = None
        self._stepped = False
        # The KV handle a prefill worker holds for us, until a decode worker takes it over.
        self._handle: KvRef | None = None

    @property
    def done(self) -> bool:
        return self.phase is Phase.DONE

    @property
    def open_handle(self) -> KvRef | None:
        """The KV handle held and not yet taken over or released (None once done, always)."""
        return self._handle

    def start(self) -> list[Action]:
        """The first actions. Called once, before any step()."""
        if self.phase is not Phase.NEW:
            raise ProtocolError("start() is called once, first")
        return self._next_attempt(self._arrived)

    def step(self, event: Event) -> list[Action]:
        """Takes one event; returns the actions it calls for, in order."""
        if isinstance(event, Cancelled):
            return [] if self.done else self._end([])
        if isinstance(event, DeadlinePassed):
            return [] if self.done else self._deadline_failure()
        if isinstance(event, NoRoute):
            self._expect(Phase.CHOOSING, event)
            return self._no_route(event)
        if isinstance(event, Chosen):
            self._expect(Phase.CHOOSING, event)
            return self._deadline_failure() if self._past_deadline(event.now) else self._chosen(event)
        if isinstance(event, PrefillAnswered):
            self._expect(Phase.PREFILLING, event)
            return self._prefilled(event)
        if isinstance(event, DecodeStepped):
            self._expect(Phase.DECODING, event)
            return self._stepped_once(event)
        if isinstance(event, PrefillFailed | DecodeFailed | DecodeEnded | Stalled):
            self._expect(Phase.PREFILLING if isinstance(event, PrefillFailed) else Phase.DECODING, event)
            if self._past_deadline(event.now):
                # The call died with the client's deadline: no worker is to blame and nobody waits for a retry.
                return self._deadline_failure()
            if isinstance(event, PrefillFailed):
                return self._prefill_failed(event)
            if isinstance(event, Stalled):
                return self._stalled(event)
            if isinstance(event, DecodeEnded):
                event = DecodeFailed(event.now, Code.UNAVAILABLE,
                                     f"decode stream from {self._decode_id} ended without a finish reason")
            return self._decode_failed(event)
        raise ProtocolError(f"unknown event {event!r}")

    # -- transitions -----------------------------------------------------------

    def _next_attempt(self, now: float) -> list[Action]:
        if self.attempts >= self.max_attempts:
            return self._fail(Code.UNAVAILABLE,
                              f"request {self.request_id} failed on {self.attempts} workers; giving up "
                              f"(tried: {', '.join(sorted(self.exclude)) or 'none'})")
        self.attempts += 1
        self.phase = Phase.CHOOSING
        self._wait_until = now + self.capacity_wait_s
        if self.deadline is not None:
            self._wait_until = min(self._wait_until, self.deadline)
        return [self._choose()]

    def _choose(self, wait_s: float = 0.0) -> Choose:
        # Without a handle, tokens already sent can only be rebuilt by a local prefill on the new decode worker.
        return Choose(exclude=frozenset(self.exclude), local=bool(self.generated) and self._handle is None,
                      produced=len(self.generated), wait_s=wait_s)

    def _no_route(self, event: NoRoute) -> list[Action]:
        if event.now >= self._wait_until:
            if event.no_capacity:
                return self._fail(Code.RESOURCE_EXHAUSTED, event.message, event.retry_after_s)
            if self._refused_full:
                return self._fail(Code.RESOURCE_EXHAUSTED,
                                  f"{event.message}; {self._refused_full} worker(s) refused this request as full",
                                  event.retry_after_s or FULL_RETRY_S)
            return self._fail(Code.UNAVAILABLE, event.message)
        return [self._choose(wait_s=min(_VIEW_POLL_S, max(_MIN_TIMEOUT_S, self._wait_until - event.now)))]

    def _chosen(self, event: Chosen) -> list[Action]:
        if not self._queued:
            self._queued = True
            self.outcome.queue_ms = (event.now - self._arrived) * 1000
        self.outcome.reason = event.reason
        self._pair = event
        if self._handle is None and not self.generated and event.prefill is not None:
            self.phase = Phase.PREFILLING
            remaining = self._remaining(event.now)
            timeout = self.prefill_timeout_s if remaining is None else min(remaining, self.prefill_timeout_s)
            return [CallPrefill(event.prefill, consumer_host=event.decode.host, timeout_s=timeout,
                                consumer_transports=event.decode.kv_transports)]
        return [self._call_decode(event.now)]

    def _call_decode(self, now: float) -> CallDecode:
        assert self._pair is not None
        decode = self._pair.decode
        self.phase = Phase.DECODING
        self._stepped = False
        self.outcome.decode_worker_id = decode.worker_id
        if self._handle is not None:
            return CallDecode(decode, self._handle, first_token=self.generated[0], generated=(),
                              timeout_s=self._remaining(now))
        self.outcome.local_prefill = True
        self.outcome.prefill_worker_id = ""
        return CallDecode(decode, None, first_token=None, generated=tuple(self.generated),
                          timeout_s=self._remaining(now))

    def _prefilled(self, event: PrefillAnswered) -> list[Action]:
        assert self._pair is not None and self._pair.prefill is not None
        if event.handle is None and not event.finish_reason:
            raise ProtocolError("a prefill answer without a handle must carry its finish reason")
        self.outcome.prefill_worker_id = self._pair.prefill.worker_id
        self.outcome.local_prefill = False
        self.outcome.queue_ms += event.queue_ms
        self.outcome.prefill_ms = event.prefill_ms
        self.outcome.cached_prompt_tokens = event.cached_prompt_tokens
        self.generated.append(event.first_token)
        self.outcome.token_times.append(event.now)
        self.outcome.ttft_ms = (event.now - self._arrived) * 1000
        emit = Emit((event.first_token,))
        if event.handle is None:
            self.outcome.finish_reason = event.finish_reason
            return [emit, self._finish(event.now)]
        self._handle = event.handle
        return [emit, self._call_decode(event.now)]

    def _stepped_once(self, event: DecodeStepped) -> list[Action]:
        actions: list[Action] = []
        if not self._stepped:
            self._stepped = True
            # The decode worker pulled the KV and released the handle itself before its first step.
            self._handle = None
            self.outcome.kv_transfer_ms += event.kv_transfer_ms
            if self.outcome.local_prefill:
                self.outcome.prefill_ms = event.prefill_ms
        if event.tokens:
            if not self.generated:
                self.outcome.ttft_ms = (event.now - self._arrived) * 1000
            self.generated.extend(event.tokens)
            self.outcome.token_times.extend([event.now] * len(event.tokens))
            actions.append(Emit(tuple(event.tokens)))
        if event.finish_reason:
            self.outcome.finish_reason = event.finish_reason
            actions.append(self._finish(event.now))
        return actions

    def _prefill_failed(self, event: PrefillFailed) -> list[Action]:
        assert self._pair is not None and self._pair.prefill is not None
        return self._worker_failed(self._pair.prefill.worker_id, event.code, event.message, event.now,
                                   mid_stream=False)

    def _decode_failed(self, event: DecodeFailed) -> list[Action]:
        actions: list[Action] = []
        if event.code in HANDLE_REFUSED and self._handle is not None:
            # The handle expired (NOT_FOUND) or does not fit this worker (FAILED_PRECONDITION): rebuild the KV
            # locally instead. Release it now: a refused handle is still held by its prefill worker until its
            # TTL, and releasing one already gone costs a call that fails harmlessly.
            if event.code is Code.FAILED_PRECONDITION:
                self.exclude.add(self._decode_id)
            actions.append(Release(self._handle))
            self._handle = None
            return actions + self._retry(event.now, mid_stream=self._stepped, why=event.code.name)
        return self._worker_failed(self._decode_id, event.code, event.message, event.now, mid_stream=self._stepped)

    def _stalled(self, event: Stalled) -> list[Action]:
        # Silence is not an error a worker reports: count it as a migration even before the first step, and
        # keep a handle the frozen worker may not have pulled yet (another decode worker can still use it).
        self.exclude.add(self._decode_id)
        actions: list[Action] = [Suspect(self._decode_id, forget_load=False)]
        return actions + self._retry(event.now, mid_stream=True, why="stalled")

    def _worker_failed(self, worker_id: str, code: Code, message: str, now: float, *,
                       mid_stream: bool) -> list[Action]:
        if code in CLIENT_ERRORS:
            return self._fail(code, message or code.name)
        self.exclude.add(worker_id)
        if code is Code.RESOURCE_EXHAUSTED:
            self._refused_full += 1
        actions: list[Action] = []
        if code in WORKER_DOWN:
            actions.append(Suspect(worker_id, forget_load=True))
        return actions + self._retry(now, mid_stream=mid_stream, why=code.name)

    def _retry(self, now: float, *, mid_stream: bool, why: str) -> list[Action]:
        actions: list[Action] = []
        if mid_stream:
            self.outcome.migrations += 1
            actions.append(Migrate(self._decode_id, produced=len(self.generated), why=why))
        else:
            self.outcome.retries += 1
        return actions + self._next_attempt(now)

    # -- endings ---------------------------------------------------------------

    def _finish(self, now: float) -> Finish:
        self.phase = Phase.DONE
        self.outcome.completion_tokens = len(self.generated)
        self.outcome.e2e_ms = (now - self._arrived) * 1000
        if self.outcome.token_times:
            self.outcome.decode_ms = (self.outcome.token_times[-1] - self.outcome.token_times[0]) * 1000
        return Finish(self.outcome)

    def _fail(self, code: Code, message: str, retry_after_s: float = 0.0) -> list[Action]:
        return self._end([Fail(code, message, retry_after_s)])

    def _deadline_failure(self) -> list[Action]:
        return self._fail(Code.DEADLINE_EXCEEDED,
                          f"request {self.request_id} passed its deadline after {self.attempts} attempt(s) and "
                          f"{len(self.generated)} token(s)")

    def _end(self, tail: list[Action]) -> list[Action]:
        """Every way out: release a held handle first, then `tail`."""
        self.phase = Phase.DONE
        actions: list[Action] = []
        if self._handle is not None:
            actions.append(Release(self._handle))
            self._handle = None
        return actions + tail

    # -- helpers ---------------------------------------------------------------

    @property
    def _decode_id(self) -> str:
        assert self._pair is not None
        return self._pair.decode.worker_id

    def _remaining(self, now: float) -> float | None:
        return None if self.deadline is None else max(_MIN_TIMEOUT_S, self.deadline - now)

    def _past_deadline(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def _expect(self, phase: Phase, event: Event) -> None:
        if self.phase is not phase:
            raise ProtocolError(f"{type(event).__name__} while {self.phase.value}, expected only while {phase.value}")
