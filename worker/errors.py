"""Engine and transport exceptions -> gRPC statuses, in one place.

Every servicer wraps its work in `rpc_errors(context)`: a request that fails
gets the status a client can act on and a message that says why, and the
service itself stays up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from engine.base import CapacityExhausted, EngineError, InvalidRequest, KvMismatch
from engine.kv.handles import StoreFull
from engine.kv.transport import KvNotFound, KvTransferError
from runtime.text import cap
from worker.admission import Refused

log = logging.getLogger(__name__)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status and message for a known failure; None for a bug."""
    if isinstance(exc, Refused):
        return exc.code, exc.message
    if isinstance(exc, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, KvMismatch):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, KvNotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, StoreFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"this prefill worker holds {exc}"
    if isinstance(exc, CapacityExhausted):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc) or "no KV blocks or batch slots free; retry elsewhere"
    if isinstance(exc, KvTransferError):
        return grpc.StatusCode.UNAVAILABLE, f"KV transfer failed: {exc}"
    if isinstance(exc, EngineError):
        return grpc.StatusCode.INTERNAL, f"engine error: {exc}"
    return None


# The key routers and the client library read (router_svc.client_errors.RETRY_AFTER_METADATA_KEY).
RETRY_AFTER_METADATA_KEY = "tandem-retry-after-ms"


def retry_hint(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """Trailing metadata saying when to come back, for a refusal that knows (Refused, StoreFull); else none."""
    retry_after_s = getattr(exc, "retry_after_s", None)
    if retry_after_s is None:
        return ()
    return ((RETRY_AFTER_METADATA_KEY, str(max(0, round(retry_after_s * 1000)))),)


@contextlib.asynccontextmanager
async def rpc_errors(context: grpc.aio.ServicerContext,
                     count: Callable[[str], None] = lambda status: None) -> AsyncIterator[None]:
    """Aborts the RPC with the mapped status for known failures; INTERNAL (logged) for bugs.

    `count(status_name)` is called once per RPC: "OK", the mapped status, or
    "CANCELLED" when the client went away.
    """
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except asyncio.CancelledError:
        count("CANCELLED")
        raise
    except Exception as exc:
        mapped = status_for(exc)
        if mapped is None:
            log.exception("unexpected failure serving a request")
            mapped = (grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        count(mapped[0].name)
        await context.abort(mapped[0], cap(mapped[1]), retry_hint(exc))
    else:
        count("OK")
