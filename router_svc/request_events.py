"""The vocabulary of a request's life in the router: status codes, events in, actions out, the Outcome.

Plain frozen values with no behaviour, shared by the pure state machine
(`router_svc.request_fsm`) and its drivers (`router_svc.pipeline` for gRPC).
Nothing here imports grpc, asyncio or etcd: a driver maps its transport's
status codes to `Code` by name and back. Every event carries `now`, in
seconds on the driver's monotonic clock; the machine reads time nowhere else.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Code(enum.StrEnum):
    """gRPC status codes by name, so that the core imports no grpc (`grpc.StatusCode[code]` maps back)."""

    OK = "OK"
    CANCELLED = "CANCELLED"
    UNKNOWN = "UNKNOWN"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"
    DATA_LOSS = "DATA_LOSS"
    UNAUTHENTICATED = "UNAUTHENTICATED"


# "This request is wrong", not "this worker is in trouble": answered as is, never retried.
CLIENT_ERRORS = frozenset({Code.INVALID_ARGUMENT, Code.OUT_OF_RANGE})
# The worker itself is in trouble: every request avoids it for a while and its load figures are stale.
WORKER_DOWN = frozenset({Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED, Code.INTERNAL, Code.UNKNOWN})
# A decode worker's answers about a KV handle: it expired (NOT_FOUND) or does not fit (FAILED_PRECONDITION).
HANDLE_REFUSED = frozenset({Code.NOT_FOUND, Code.FAILED_PRECONDITION})


@dataclass(frozen=True)
class Worker:
    worker_id: str
    endpoint: str
    host: str = ""
    # The KV transports it accepts as a decode worker (from its record); empty: unknown.
    kv_transports: tuple[str, ...] = ()
    # The node its record names (its certificate identity is derived from worker_id and node).
    node: str = ""


@dataclass(frozen=True)
class KvRef:
    """A KV handle a prefill worker holds for this request until it is pulled, released or expires.

    `message` is the driver's own form of the handle (the KvHandle proto),
    carried untouched from PrefillAnswered to CallDecode; it takes no part in
    equality.
    """

    endpoint: str
    handle_id: str
    message: object = field(default=None, compare=False, repr=False)


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


# -- events: what happened, fed to RequestLife.step() -------------------------

@dataclass(frozen=True)
class Chosen:
    """The policy picked a pair; `prefill` None means the decode worker prefills locally."""

    now: float
    decode: Worker
    prefill: Worker | None = None
    reason: str = ""


@dataclass(frozen=True)
class NoRoute:
    """The policy found no decode worker: none routable (`no_capacity` False) or all full (True)."""

    now: float
    message: str
    no_capacity: bool = False
    retry_after_s: float = 0.0


@dataclass(frozen=True)
class PrefillAnswered:
    """The prefill worker's reply. Without a handle the sequence ended at its first token:
    `finish_reason` must then say why."""

    now: float
    first_token: int
    handle: KvRef | None = None
    finish_reason: str = ""
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class PrefillFailed:
    now: float
    code: Code
    message: str = ""


@dataclass(frozen=True)
class DecodeStepped:
    """One message of the decode stream; the first of a call carries its kv_transfer_ms and prefill_ms."""

    now: float
    tokens: tuple[int, ...] = ()
    finish_reason: str = ""
    kv_transfer_ms: float = 0.0
    prefill_ms: float = 0.0


@dataclass(frozen=True)
class DecodeFailed:
    now: float
    code: Code
    message: str = ""


@dataclass(frozen=True)
class DecodeEnded:
    """The decode stream closed cleanly but without a finish reason (a worker shutting down)."""

    now: float


@dataclass(frozen=True)
class Stalled:
    """The decode stream was silent for longer than the stall timeout; the driver cancelled it."""

    now: float


@dataclass(frozen=True)
class Cancelled:
    """The client went away (or the driver is leaving for any other reason). Safe to feed twice."""

    now: float


@dataclass(frozen=True)
class DeadlinePassed:
    now: float


Event = (Chosen | NoRoute | PrefillAnswered | PrefillFailed | DecodeStepped | DecodeFailed | DecodeEnded | Stalled
         | Cancelled | DeadlinePassed)


# -- actions: what the driver must do, in order ---------------------------------

@dataclass(frozen=True)
class Choose:
    """Ask the policy for a pair, avoiding `exclude`; first wait up to `wait_s` for the view to change.

    `local`: the decode worker must prefill (migration without a handle).
    `produced`: tokens already sent, which the new pair continues after.
    Answer with Chosen or NoRoute.
    """

    exclude: frozenset[str]
    local: bool
    produced: int
    wait_s: float = 0.0


@dataclass(frozen=True)
class CallPrefill:
    """Answer with PrefillAnswered or PrefillFailed."""

    worker: Worker
    consumer_host: str
    timeout_s: float
    # What the decode worker that will pull the KV accepts; empty: unknown.
    consumer_transports: tuple[str, ...] = ()


@dataclass(frozen=True)
class CallDecode:
    """With `handle`: decode from its KV and `first_token`. Without: prefill locally on prompt + `generated`
    and continue after them. Answer with DecodeStepped until it finishes, or a failure event."""

    worker: Worker
    handle: KvRef | None
    first_token: int | None
    generated: tuple[int, ...]
    timeout_s: float | None


@dataclass(frozen=True)
class Release:
    """Free `handle` on its prefill worker now rather than at its TTL (best effort; an expired one is harmless)."""

    handle: KvRef


@dataclass(frozen=True)
class Emit:
    """Send these tokens to the client, now and in order."""

    tokens: tuple[int, ...]


@dataclass(frozen=True)
class Suspect:
    """Every request should avoid this worker for a while; with `forget_load`, its load figures are stale."""

    worker_id: str
    forget_load: bool


@dataclass(frozen=True)
class Migrate:
    """The sequence leaves `worker_id` after `produced` tokens (for the log; a Choose follows)."""

    worker_id: str
    produced: int
    why: str


@dataclass(frozen=True)
class Finish:
    outcome: Outcome


@dataclass(frozen=True)
class Fail:
    """Answer the client `code` with `message`; `retry_after_s` > 0 is a hint to send with it."""

    code: Code
    message: str
    retry_after_s: float = 0.0


Action = Choose | CallPrefill | CallDecode | Release | Emit | Suspect | Migrate | Finish | Fail
