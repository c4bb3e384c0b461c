"""A load client for any OpenAI-compatible `POST /v1/completions` server, in a process of its own.

    client = LoadClient().start()                     # spawns the client process
    result, start, end = client.run(job, at_start, at_end)   # called at the measured window's edges
    client.close()                                    # safe twice

Not a benchmark itself. HTTP/1.1 over raw asyncio streams, one keep-alive
connection per concurrent caller, TCP_NODELAY, and TCP_QUICKACK re-armed
after every read: Linux otherwise delays the ACKs of a stream's small
writes, and a server that waits for them stalls ~40 ms per SSE answer on
loopback. Answers may be sized (Content-Length), chunked, or end at close.

A job's requests are numbered `first .. first + warmup + requests - 1`; the
prompt of request i is `job.prompt(i)` (a picklable callable: token ids or
text). Every answer must be HTTP 200 with the usage of a completed request:
`max_tokens` completion tokens (the job asks `ignore_eos`) and, for a
token-id prompt, its length in prompt tokens; anything else counts as an
error, with the first few kept as text. Streamed requests ask
`stream_options.include_usage`; their time to first token is the arrival of
the first chunk that carries a choice.

`complete()` and `Connection` are the reusable pieces: a benchmark with its
own schedule (multi-turn sessions, say) drives them and gets each answer's
text, usage, latency and time to first token.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

S = TypeVar("S")
E = TypeVar("E")
Prompt = list[int] | str


class LoadError(Exception):
    """An answer that is not a completed request (status, framing, or usage)."""


@dataclass(frozen=True)
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    ttft_s: float  # the whole latency for a non-streamed answer
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens, where the server reports it


def _cached(usage: dict[str, Any]) -> int:
    return int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


@dataclass(frozen=True)
class UniquePrompts:
    """Token-id prompts of `tokens` tokens whose first two differ per request (62,500 distinct): no prefix hits."""

    tokens: int

    def __call__(self, i: int) -> Prompt:
        return [3 + i % 250, 3 + (i // 250) % 250, *range(40, 40 + self.tokens - 2)]


@dataclass(frozen=True)
class LoadJob:
    host: str
    port: int
    model: str
    prompt: Callable[[int], Prompt]
    stream: bool
    requests: int
    warmup: int
    first: int = 0
    concurrency: int = 16
    max_tokens: int = 32
    timeout_s: float = 60.0


@dataclass
class LoadResult:
    latencies_s: list[float] = field(default_factory=list)
    ttfts_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    client_cpu_s: float = 0.0
    error_count: int = 0
    warmup_error_count: int = 0
    errors: list[str] = field(default_factory=list)  # the first few, as text


class Connection:
    """One HTTP/1.1 keep-alive connection: one request at a time, not safe for concurrent use."""

    def __init__(self, host: str, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.host, self.port = host, port
        self._reader, self._writer = reader, writer
        self._sock = writer.get_extra_info("socket")
        self._buf = bytearray()
        self.reusable = True

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(host, port, reader, writer)

    async def close(self) -> None:
        """Safe twice."""
        self.reusable = False
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except OSError:
            pass

    async def post(self, path: str, body: bytes) -> tuple[int, dict[str, str]]:
        """Sends the request; returns the status and headers (names lower-cased). Read the body before reusing."""
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Accept: */*\r\nContent-Length: {len(body)}\r\n\r\n")
        self._writer.write(head.encode("latin-1") + body)
        while (end := self._buf.find(b"\r\n\r\n")) < 0:
            await self._fill()
        lines = bytes(self._buf[:end]).decode("latin-1").split("\r\n")
        del self._buf[:end + 4]
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("connection", "").lower() == "close":
            self.reusable = False
        return status, headers

    async def pieces(self, headers: dict[str, str]) -> AsyncIterator[bytes]:
        """The body of the answer whose `headers` these are, piece by piece as it arrives."""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                line = await self._line()
                size = int(line.split(b";", 1)[0], 16)
                if size == 0:
                    while await self._line():  # trailers, up to the empty line
                        pass
                    return
                data = await self._exact(size + 2)
                yield data[:-2]
        elif "content-length" in headers:
            left = int(headers["content-length"])
            while left:
                if not self._buf:
                    await self._fill()
                data = bytes(self._buf[:left])
                del self._buf[:len(data)]
                left -= len(data)
                yield data
        else:  # the body ends when the server closes
            self.reusable = False
            while True:
                if self._buf:
                    data = bytes(self._buf)
                    self._buf.clear()
                    yield data
                if not await self._fill(eof_ok=True):
                    return

    async def body(self, headers: dict[str, str]) -> bytes:
        return b"".join([piece async for piece in self.pieces(headers)])

    async def _fill(self, eof_ok: bool = False) -> bool:
        data = await self._reader.read(65536)
        # Re-armed after every read: the kernel falls back to delayed ACKs after a while.
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        if not data:
            if eof_ok:
                return False
            raise LoadError("the server closed the connection mid-answer")
        self._buf += data
        return True

    async def _line(self) -> bytes:
        while (end := self._buf.find(b"\r\n")) < 0:
            await self._fill()
        line = bytes(self._buf[:end])
        del self._buf[:end + 2]
        return line

    async def _exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            await self._fill()
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data


async def complete(conn: Connection, body: dict[str, Any]) -> Answer:
    """One `POST /v1/completions` (streamed if `body["stream"]`); raises LoadError unless answered 200 with usage."""
    started = time.perf_counter()
    status, headers = await conn.post("/v1/completions", json.dumps(body).encode())
    if status != 200:
        raise LoadError(f"HTTP {status}: {(await conn.body(headers))[:200]!r}")
    if not body.get("stream"):
        answer = json.loads(await conn.body(headers))
        latency = time.perf_counter() - started
        usage = answer["usage"]
        return Answer(answer["choices"][0]["text"], usage["prompt_tokens"], usage["completion_tokens"],
                      latency, latency, _cached(usage))
    ttft = 0.0
    texts: list[str] = []
    usage = None
    done = False
    pending = b""
    async for piece in conn.pieces(headers):
        pending += piece
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if not line.startswith(b"data:"):
                continue  # blank separators, comments, event names
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                raise LoadError(f"error event: {str(chunk['error'])[:200]}")
            if chunk.get("choices"):
                if not ttft:
                    ttft = time.perf_counter() - started
                texts.append(chunk["choices"][0].get("text") or "")
            if chunk.get("usage"):
                usage = chunk["usage"]
    latency = time.perf_counter() - started
    if not done or usage is None:
        raise LoadError("stream ended without " + ("usage" if done else "[DONE]"))
    return Answer("".join(texts), usage["prompt_tokens"], usage["completion_tokens"], latency, ttft,
                  _cached(usage))


async def _run(job: LoadJob, conns: list[Connection], first: int, total: int, result: LoadResult,
               record: bool) -> int:
    """`total` requests from `first` by `len(conns)` callers; returns the number of errors."""
    numbers = iter(range(first, first + total))
    errors = 0

    async def caller(slot: int) -> None:
        nonlocal errors
        for i in numbers:
            prompt = job.prompt(i)
            body: dict[str, Any] = {"model": job.model, "prompt": prompt, "max_tokens": job.max_tokens,
                                    "ignore_eos": True, "stream": job.stream}
            if job.stream:
                body["stream_options"] = {"include_usage": True}
            try:
                if not conns[slot].reusable:
                    conns[slot] = await Connection.open(job.host, job.port)
                async with asyncio.timeout(job.timeout_s):
                    answer = await complete(conns[slot], body)
                if answer.completion_tokens != job.max_tokens:
                    raise LoadError(f"{answer.completion_tokens} completion tokens, wanted {job.max_tokens}")
                if isinstance(prompt, list) and answer.prompt_tokens != len(prompt):
                    raise LoadError(f"{answer.prompt_tokens} prompt tokens, sent {len(prompt)}")
            except (LoadError, OSError, TimeoutError, ValueError, KeyError, IndexError, TypeError) as exc:
                errors += 1
                if len(result.errors) < 5:
                    result.errors.append(f"request {i}: {type(exc).__name__}: {exc}"[:300])
                # The connection's state is unknown now: the next request opens a new one.
                await conns[slot].close()
                continue
            if record:
                result.latencies_s.append(answer.latency_s)
                if job.stream:
                    result.ttfts_s.append(answer.ttft_s)

    await asyncio.gather(*(caller(slot) for slot in range(len(conns))))
    return errors


async def _serve(job: LoadJob, pipe: Any) -> None:
    conns = [await Connection.open(job.host, job.port) for _ in range(job.concurrency)]
    result = LoadResult()
    try:
        result.warmup_error_count = await _run(job, conns, job.first, job.warmup, result, record=False)
        pipe.send("warm")
        # Blocking here is harmless: nothing is in flight until the parent says "measure".
        if pipe.recv() != "measure":
            raise RuntimeError("the parent did not say 'measure'")
        cpu, started = time.process_time(), time.perf_counter()
        result.error_count = await _run(job, conns, job.first + job.warmup, job.requests, result, record=True)
        result.wall_s = time.perf_counter() - started
        result.client_cpu_s = time.process_time() - cpu
        pipe.send("done")
    finally:
        for conn in conns:
            await conn.close()
    pipe.send(result)


def client_main(pipe: Any) -> None:
    """The client process: runs each LoadJob it receives (see LoadClient.run) until it receives None.

    A job that fails outright (no connection, say) is answered "failed: why" in place of the next word.
    """
    while (job := pipe.recv()) is not None:
        try:
            asyncio.run(_serve(job, pipe))
        except Exception as exc:  # reported to the parent, which raises it
            pipe.send(f"failed: {type(exc).__name__}: {exc}")


class LoadClient:
    """The parent's handle on a client process (spawned, so no server state is inherited). One job at a time."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self._pipe, child = ctx.Pipe()
        self._process = ctx.Process(target=client_main, args=(child,), daemon=True, name="openai-load")

    def start(self) -> LoadClient:
        self._process.start()
        return self

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def run(self, job: LoadJob, at_start: Callable[[], S], at_end: Callable[[], E]) -> tuple[LoadResult, S, E]:
        """Runs `job`: warm-up, `at_start()`, the measured window, `at_end()`. Returns what both returned."""
        self._pipe.send(job)
        self._expect("warm")
        start = at_start()
        self._pipe.send("measure")
        self._expect("done")
        end = at_end()
        result = self._pipe.recv()
        return result, start, end

    def _expect(self, word: str) -> None:
        got = self._pipe.recv()
        if got != word:
            raise RuntimeError(f"the load client sent {got!r}, expected {word!r}")

    def close(self) -> None:
        """Ends the process (asks, then kills after 10 s). Safe twice."""
        if self._process.is_alive():
            try:
                self._pipe.send(None)
            except OSError:
                pass
            self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
