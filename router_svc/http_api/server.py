"""The OpenAI-compatible HTTP front of a router (aiohttp, in the router's own event loop).

    GET  /v1/models             models the router serves, with their limits
    GET  /v1/models/{model}     one of them
    POST /v1/completions        prompt (text or token ids) -> text
    POST /v1/chat/completions   messages, rendered with the model's chat template -> text
    GET  /health                200 while some model has a routable worker, else 503

Each request goes straight to router_svc.inference.InferenceCore, the code
the gRPC servicer runs: same validation, routing, migration, cancellation
and backpressure, one hop. router_svc.http_api.wire translates the JSON.

- Streaming (`"stream": true`) answers server-sent events once the first
  token exists; errors found before it (bad request, no capacity) still get
  a proper HTTP status. An error after it is a last `data: {"error": ...}`.
- A client that goes away cancels its request: aiohttp cancels the handler
  (handler_cancellation), which closes the core's generator, which cancels
  the worker calls and frees the worker's sequence.
- Every answer carries `X-Request-Id`, the id in the router's logs, its
  worker calls and the metrics' exemplars; a client may choose it by
  sending that header (1..128 printable ASCII characters).
- With API keys configured, /v1/* needs `Authorization: Bearer KEY`; /health does not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from router_svc.http_api import wire
from router_svc.http_api.keys import ApiKeys
from router_svc.inference import InferenceCore
from router_svc.metrics import RouterMetrics
from router_svc.pipeline import RouteFailure
from router_svc.validation import RequestError, valid_request_id
from runtime.logs import request_scope
from runtime.text import cap, clip
from tandem.v1 import inference_pb2

log = logging.getLogger(__name__)

# Bodies larger than this are refused (413) before parsing. Prompts the context can hold are far
# smaller; the router's validation bounds the rest (aiohttp's default, 1 MiB, is too small for
# a long prompt).
MAX_BODY_BYTES = 64 * 1024 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


def error_response(code: str, message: str, *, param: str | None = None, retry_after_s: float = 0.0,
                   request_id: str = "") -> web.Response:
    """OpenAI's error JSON with the HTTP status of gRPC status `code` (a name), Retry-After on 429/503."""
    headers = {}
    retry_after = wire.retry_after_header(code, retry_after_s)
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    if request_id:
        headers["X-Request-Id"] = request_id
    if code == "UNAUTHENTICATED":
        headers["WWW-Authenticate"] = "Bearer"
    return _json(wire.error_body(code, cap(message), param), wire.http_status(code), headers)


def _failure(exc: RequestError | RouteFailure | wire.ApiError, request_id: str) -> web.Response:
    if isinstance(exc, wire.ApiError):
        return error_response(exc.code, exc.message, param=exc.param, request_id=request_id)
    retry = exc.retry_after_s if isinstance(exc, RouteFailure) else 0.0
    return error_response(exc.code.name, exc.message, retry_after_s=retry, request_id=request_id)


class HttpFront:
    """Start once, stop once. `port` is the bound port after start()."""

    def __init__(self, core: InferenceCore, metrics: RouterMetrics, keys: ApiKeys, *,
                 ssl_context: ssl.SSLContext | None = None, shutdown_grace: float = 10.0) -> None:
        self.core = core
        self.metrics = metrics
        self.keys = keys
        self.ssl_context = ssl_context
        self.app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY_BYTES)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/v1/models/{model:.+}", self.model)
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_post("/v1/chat/completions", self.chat_completions)
        self.app.router.add_get("/health", self.health)
        # handler_cancellation: a client that disconnects cancels its handler, hence its request.
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                                     shutdown_timeout=shutdown_grace)
        self.port = 0

    async def start(self, listen: str, reuse_port: bool = False) -> int:
        """Bind `listen` (HOST:PORT; port 0: any free one) and serve; returns the bound port.

        `reuse_port`: SO_REUSEPORT, for router processes sharing the port (--processes).
        """
        host, _, port = listen.rpartition(":")
        await self._runner.setup()
        site = web.TCPSite(self._runner, host.strip("[]") or None, int(port), ssl_context=self.ssl_context,
                           reuse_port=reuse_port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise OSError(f"cannot listen on {listen} (--http-listen): {exc.strerror or exc}") from None
        self.port = int(self._runner.addresses[0][1])
        log.info("http api listening", extra={"listen": listen, "port": self.port,
                                              "tls": self.ssl_context is not None, "api_keys": self.keys.enabled})
        return self.port

    async def stop(self) -> None:
        """Stop accepting; requests in flight get up to the shutdown grace to finish. Safe twice."""
        if self._runner.server is not None:
            await self._runner.cleanup()

    # -- middleware: auth, request ids, errors in OpenAI's shape -----------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        given = request.headers.get("X-Request-Id", "")
        request_id = given if valid_request_id(given) else uuid.uuid4().hex
        request["request_id"] = request_id
        with request_scope(request_id):
            if path.startswith("/v1/") and not self.keys.allows(request.headers.get("Authorization")):
                response: web.StreamResponse = error_response(
                    "UNAUTHENTICATED", "missing or unknown API key: send Authorization: Bearer KEY",
                    request_id=request_id)
            else:
                try:
                    response = await handler(request)
                except web.HTTPException as exc:
                    # aiohttp's own answers (404, 405, 413) in OpenAI's error shape.
                    code = {404: "NOT_FOUND", 405: "UNIMPLEMENTED", 413: "INVALID_ARGUMENT"}.get(exc.status, "UNKNOWN")
                    message = (f"no such endpoint: {request.method} {cap(path, 200)}" if exc.status in (404, 405)
                               else f"{exc.reason}: the body must be at most {MAX_BODY_BYTES} bytes"
                               if exc.status == 413 else exc.reason)
                    response = error_response(code, message, request_id=request_id)
                    response.set_status(exc.status)
                except Exception:
                    # A bug must cost one request a 500 in the usual shape, not the connection.
                    log.exception("http request failed")
                    response = error_response("INTERNAL", f"internal error; the router's log has request id "
                                                          f"{request_id}", request_id=request_id)
            self.metrics.http_requests.labels(_metric_path(path), str(response.status)).inc()
            return response

    # -- endpoints --------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.StreamResponse:
        return _json(wire.models_body(self.core.list_models(), int(time.time())))

    async def model(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["model"]
        listed = wire.models_body(self.core.list_models(), int(time.time()))["data"]
        found = next((m for m in listed if m["id"] == name), None)
        if found is None:
            known = ", ".join(m["id"] for m in listed) or "none"
            return error_response("NOT_FOUND", f"unknown model {clip(name)}; known: {known}",
                                  request_id=request["request_id"])
        return _json(found)

    async def health(self, request: web.Request) -> web.StreamResponse:
        models = self.core.routable_models()
        if models:
            return _json({"status": "ok", "models": models})
        return _json({"status": "unavailable", "models": [],
                      "message": "no model has a routable decode worker now"}, 503, {"Retry-After": "1"})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, wire.parse_completion)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, wire.parse_chat)

    async def _generate(self, request: web.Request,
                        parse: Callable[..., wire.ParsedRequest]) -> web.StreamResponse:
        request_id: str = request["request_id"]
        try:
            try:
                body = json.loads(await request.read())
            except ValueError as exc:
                raise wire.ApiError("INVALID_ARGUMENT", f"the request body is not valid JSON: {exc}") from None
            parsed = parse(body, request_id=request_id)
            if parsed.stream:
                return await self._stream(request, parsed)
            answer = await self.core.complete(parsed.request, add_generation_prompt=parsed.add_generation_prompt)
        except (wire.ApiError, RequestError, RouteFailure) as exc:
            if isinstance(exc, wire.ApiError):
                # Refused before the shared handling saw it: count it where gRPC refusals are counted.
                self.metrics.requests.labels("", exc.code).inc()
            if not isinstance(exc, RouteFailure):  # the shared handling logs those (warning)
                log.info("http request refused: %s", exc.message,
                         extra={"code": exc.code if isinstance(exc, wire.ApiError) else exc.code.name})
            return _failure(exc, request_id)
        return _json(wire.completion_body(parsed, int(time.time()), answer), headers={"X-Request-Id": request_id})

    async def _stream(self, request: web.Request, parsed: wire.ParsedRequest) -> web.StreamResponse:
        """Server-sent events; RequestError / RouteFailure before the first token propagate (a plain error)."""
        request_id = parsed.request.request_id
        created = int(time.time())
        steps = self.core.generate(parsed.request, add_generation_prompt=parsed.add_generation_prompt)
        async with contextlib.aclosing(steps):
            piece = await anext(steps)  # the first token (or an error, answered with its status)
            response = web.StreamResponse(headers={
                "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
                "X-Request-Id": request_id})
            await response.prepare(request)
            texts = wire.TextEvents(parsed, request_id, created)
            first = True
            try:
                while True:
                    last = piece.HasField("usage")
                    # A piece whose text is held back (part of a character) adds nothing to send.
                    if first or last or piece.text:
                        await response.write(self._event(parsed, request_id, created, piece, first, texts))
                        first = False
                    if last:
                        break
                    piece = await anext(steps)
                await response.write(wire.SSE_DONE)
            except (RequestError, RouteFailure) as exc:
                # After the headers: the status is sent; say it in the stream, as OpenAI does.
                code = exc.code.name
                await response.write(wire.sse(wire.error_body(code, cap(exc.message))))
            except ConnectionResetError:
                # The client went away between two writes; closing `steps` frees the sequence.
                log.info("client disconnected mid-stream")
            return response

    def _event(self, parsed: wire.ParsedRequest, request_id: str, created: int,
               piece: inference_pb2.GenerateResponse, first: bool, texts: wire.TextEvents) -> bytes:
        if not piece.HasField("usage"):
            return texts.event(piece.text, first=first)
        events = []
        if first and parsed.chat:
            events.append(wire.sse(wire.text_chunk(parsed, request_id, created, "", first=True)))
        events.append(wire.sse(wire.final_chunk(parsed, request_id, created, piece.text, piece.finish_reason)))
        if parsed.include_usage:
            events.append(wire.sse(wire.usage_chunk(parsed, request_id, created, piece.usage)))
        return b"".join(events)


_PATHS = frozenset({"/v1/models", "/v1/completions", "/v1/chat/completions", "/health"})


def _metric_path(path: str) -> str:
    """The `path` label: a known endpoint, `/v1/models/{model}`, or `other` (bounded cardinality)."""
    if path in _PATHS:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"


def server_ssl_context(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    """TLS for the HTTP port from PEM files (the router's --tls-cert / --tls-key / --tls-client-ca)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if client_ca:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


__all__ = ["HttpFront", "error_response", "server_ssl_context"]
