"""CPU per request of candidate HTTP stacks for the router's OpenAI front, with no router behind them.

    .venv/bin/python bench/http_api.py --stacks

Each stack serves the same two handlers in a process of its own: a JSON
completion (parse the body, answer ~300 bytes of JSON) and a streamed one
(32 server-sent events, then `data: [DONE]`). The same aiohttp client in
this process loads each in turn; the server's CPU seconds come from /proc.
What differs is only the HTTP stack: its parser, its request and response
objects, its ASGI or handler plumbing. Not a test; imported by http_api.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

from _common import cpu_seconds, table

STACKS = ("aiohttp", "starlette+uvicorn", "fastapi+uvicorn")
CHUNKS = 32


def _answer(body: dict[str, object]) -> bytes:
    return json.dumps({"id": "cmpl-x", "object": "text_completion", "created": 0, "model": body.get("model"),
                       "choices": [{"index": 0, "text": "x" * 32, "finish_reason": "length", "logprobs": None}],
                       "usage": {"prompt_tokens": 8, "completion_tokens": 32, "total_tokens": 40}}).encode()


def _chunk(i: int) -> bytes:
    return b"data: " + json.dumps({"id": "cmpl-x", "object": "text_completion", "created": 0,
                                   "choices": [{"index": 0, "text": "x", "finish_reason": None}],
                                   "n": i}).encode() + b"\n\n"


def serve(stack: str, port: int) -> None:
    """Serve `stack` on 127.0.0.1:`port` until killed."""
    if stack == "aiohttp":
        from aiohttp import web

        async def complete(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            if not body.get("stream"):
                return web.Response(body=_answer(body), content_type="application/json")
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for i in range(CHUNKS):
                await response.write(_chunk(i))
            await response.write(b"data: [DONE]\n\n")
            return response

        app = web.Application()
        app.router.add_post("/v1/completions", complete)
        web.run_app(app, host="127.0.0.1", port=port, print=None, handler_cancellation=True)
        return

    import uvicorn
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse

    async def events() -> object:
        for i in range(CHUNKS):
            yield _chunk(i)
        yield b"data: [DONE]\n\n"

    async def handler(request: Request) -> Response:
        body = json.loads(await request.body())
        if not body.get("stream"):
            return Response(_answer(body), media_type="application/json")
        return StreamingResponse(events(), media_type="text/event-stream")  # type: ignore[arg-type]

    if stack == "fastapi+uvicorn":
        from fastapi import FastAPI

        api = FastAPI()
        # Postponed annotations name classes local to this function: give FastAPI the real ones.
        handler.__annotations__ = {"request": Request, "return": Response}
        api.add_api_route("/v1/completions", handler, methods=["POST"])
        asgi: object = api
    else:
        from starlette.applications import Starlette
        from starlette.routing import Route

        asgi = Starlette(routes=[Route("/v1/completions", handler, methods=["POST"])])
    uvicorn.run(asgi, host="127.0.0.1", port=port, log_level="warning", access_log=False,  # type: ignore[arg-type]
                loop="asyncio", http="httptools")


async def _load(port: int, requests: int, concurrency: int, stream: bool) -> float:
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/completions"
    body = {"model": "m", "prompt": "hello", "max_tokens": CHUNKS, "stream": stream}
    queue = iter(range(requests))
    started = time.perf_counter()

    async def one(session: aiohttp.ClientSession) -> None:
        for _ in queue:
            async with session.post(url, json=body) as response:
                await response.read()
                assert response.status == 200, (response.status, await response.text())

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session) for _ in range(concurrency)))
    return time.perf_counter() - started


def _wait_port(port: int, timeout: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def compare(requests: int = 3000, concurrency: int = 16) -> str:
    """Run every stack in turn; the table of its CPU per request and requests/s."""
    import socket

    rows = []
    for stack in STACKS:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        child = subprocess.Popen([sys.executable, os.path.abspath(__file__), stack, str(port)])
        try:
            _wait_port(port)
            for stream in (False, True):
                asyncio.run(_load(port, max(100, requests // 10), concurrency, stream))  # warm-up
                before = cpu_seconds(child.pid)
                elapsed = asyncio.run(_load(port, requests, concurrency, stream))
                used = cpu_seconds(child.pid) - before
                rows.append([stack, "stream" if stream else "json", f"{requests / elapsed:.0f}",
                             f"{used / requests * 1000:.3f}"])
        finally:
            child.terminate()
            child.wait(10)
    return table(["stack", "answer", "req/s", "server CPU ms/req"], rows)


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
