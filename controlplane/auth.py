"""Bearer-token check for the Admin API's mutations.

Reads (FleetStatus and the List* calls) stay open; every other Admin method,
including any added later, requires `authorization: Bearer <token>` metadata
when a token is configured, and is refused with UNAUTHENTICATED otherwise.
Health and reflection are never checked. Tokens are compared in constant
time.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

ADMIN_SERVICE = "tandem.v1.Admin"
READ_METHODS = frozenset({"FleetStatus", "ListNodes", "ListGpus", "ListWorkers", "ListLeases", "ListModelSpecs",
                          "GetPlan"})


def load_token(token: str, token_file: Path | None) -> str:
    """The configured admin token ("" for none). ValueError naming the setting when unusable."""
    if token and token_file is not None:
        raise ValueError("set admin_token or admin_token_file, not both")
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise ValueError(f"admin_token_file {token_file}: {exc.strerror}") from None
        if not token:
            raise ValueError(f"admin_token_file {token_file} is empty")
    if token and (any(c.isspace() for c in token) or not token.isprintable()):
        raise ValueError("admin_token must be printable without spaces")
    return token


def requires_token(method: str) -> bool:
    """True for Admin methods that change something ("/tandem.v1.Admin/DrainWorker")."""
    service, _, name = method.lstrip("/").partition("/")
    return service == ADMIN_SERVICE and name not in READ_METHODS


def bearer_token(metadata: Any) -> str:
    """The token of an `authorization: Bearer <token>` entry, or ""."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return ""


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses Admin mutations without the right bearer token. Stateless; may serve concurrent calls."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("BearerTokenInterceptor needs a non-empty token")
        self._token = token.encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if not requires_token(method):
            return await continuation(handler_call_details)
        offered = bearer_token(handler_call_details.invocation_metadata)
        if offered and hmac.compare_digest(offered.encode(), self._token):
            return await continuation(handler_call_details)
        why = "wrong bearer token" if offered else "no bearer token"
        log.warning("admin mutation refused", extra={"method": method, "reason": why})
        message = (f"{method.rsplit('/', 1)[-1]} needs 'authorization: Bearer <token>' metadata with the "
                   f"control plane's admin token ({why} given)")

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        return grpc.unary_unary_rpc_method_handler(refuse)
