"""The client library's error type, and the retry hint a router attaches to RESOURCE_EXHAUSTED.

A router that answers RESOURCE_EXHAUSTED says when to come back in two
places: trailing metadata `tandem-retry-after-ms` (for programs) and the
message, "... retry after 1.5s" (for people). `retry_hint_metadata` and
`retry_after_of` are the two ends of that contract.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import grpc

RETRY_AFTER_METADATA_KEY = "tandem-retry-after-ms"
_RETRY_AFTER_TEXT = re.compile(r"retry after (\d+(?:\.\d+)?)\s*(ms|s)\b", re.IGNORECASE)


class TandemError(Exception):
    """A call failed: `code` is the gRPC status, `message` the server's (or the client's) reason."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        request_id: str = "",
        retry_after_s: float | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        # Set on RESOURCE_EXHAUSTED when the server said when to retry.
        self.retry_after_s = retry_after_s
        # Calls made, retries included.
        self.attempts = attempts


def retry_hint_metadata(retry_after_s: float) -> tuple[tuple[str, str], ...]:
    """Trailing metadata a server sets next to RESOURCE_EXHAUSTED."""
    return ((RETRY_AFTER_METADATA_KEY, str(max(0, round(retry_after_s * 1000)))),)


def retry_after_of(message: str, trailing_metadata: Iterable[Any] | None) -> float | None:
    """The server's retry hint in seconds: metadata first, then the message; None when absent."""
    for item in trailing_metadata or ():
        key, value = (item.key, item.value) if hasattr(item, "key") else item
        if key == RETRY_AFTER_METADATA_KEY:
            try:
                return max(0.0, float(value) / 1000.0)
            except (TypeError, ValueError):
                break
    match = _RETRY_AFTER_TEXT.search(message or "")
    if match is None:
        return None
    value = float(match.group(1))
    return value / 1000.0 if match.group(2).lower() == "ms" else value


def error_from_rpc(err: grpc.RpcError, *, request_id: str = "", attempts: int = 1) -> TandemError:
    """A TandemError from what grpc raised (sync RpcError or grpc.aio.AioRpcError)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = (err.details() if hasattr(err, "details") else str(err)) or ""
    trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    retry_after = retry_after_of(message, trailing) if code is grpc.StatusCode.RESOURCE_EXHAUSTED else None
    return TandemError(code, message, request_id=request_id, retry_after_s=retry_after, attempts=attempts)
