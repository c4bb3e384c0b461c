"""A load generator for drills: N concurrent token streams against a router, every token recorded.

    load = LoadGenerator(router.endpoint, "llama-3-8b", streams=32, sampling=..., prompt=lambda s, i: [...])
    await load.start()                     # each stream loops: Generate, record, next request
                                           # (repeat=False: one request per stream)
    await load.wait_tokens(10)             # every stream has at least 10 tokens of its current request
    ... break something ...
    report = await load.stop()             # lets each stream finish its current request, then stops
    assert report.failures == []

Or one request per stream, all at once: `report = await load.run_once()`.

Every request is recorded as a `StreamResult`: the prompt it sent, every
token id it received in order, the final status (`grpc.StatusCode.OK` or the
error code) and the route the router reported. Nothing is retried here: a
drill wants to see the first failure a client would see.

Contract: `start()` once per generator; `stop()` is safe to call twice and
never raises for request failures (they are in the report). Prompts come
from `prompt(stream, iteration)`, so a drill can compute every expected
generation afterwards (sim tokens are a pure function of the context).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from tandem.v1 import common_pb2, inference_pb2, inference_pb2_grpc

PromptFn = Callable[[int, int], list[int]]


def default_prompt(stream: int, iteration: int) -> list[int]:
    """A distinct 40-token prompt per (stream, iteration), long enough to disaggregate."""
    return [32 + (stream * 7 + iteration) % 90, 33 + stream % 90, *range(40, 78)]


@dataclass
class StreamResult:
    """One request as the client saw it."""

    stream: int
    iteration: int
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    status: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""
    finish_reason: int = 0
    migrations: int = 0
    retries: int = 0
    prefill_worker_id: str = ""
    decode_worker_id: str = ""
    done: bool = False

    @property
    def ok(self) -> bool:
        return self.done and self.status == grpc.StatusCode.OK

    def describe(self) -> str:
        return (f"stream {self.stream} request {self.iteration}: {self.status.name} {self.details!r} "
                f"after {len(self.tokens)} tokens")


@dataclass
class LoadReport:
    results: list[StreamResult]
    seconds: float

    @property
    def failures(self) -> list[str]:
        """One line per request that did not end OK (empty when all did)."""
        return [r.describe() for r in self.results if not r.ok]

    @property
    def completed(self) -> int:
        return sum(1 for r in self.results if r.ok)

    @property
    def tokens(self) -> int:
        return sum(len(r.tokens) for r in self.results)

    @property
    def migrations(self) -> int:
        return sum(r.migrations for r in self.results)


class LoadGenerator:
    def __init__(self, endpoint: str, model: str, *, streams: int, sampling: common_pb2.SamplingParams,
                 prompt: PromptFn = default_prompt, timeout: float = 120.0) -> None:
        if streams < 1:
            raise ValueError(f"streams must be >= 1, got {streams}")
        self.endpoint = endpoint
        self.model = model
        self.streams = streams
        self.sampling = sampling
        self.prompt = prompt
        self.timeout = timeout
        self.results: list[StreamResult] = []
        self._current: list[StreamResult | None] = [None] * streams
        self._stopping = asyncio.Event()
        self._progress = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._channel: grpc.aio.Channel | None = None
        self._started_at = 0.0

    # -- running ----------------------------------------------------------------

    async def start(self, *, repeat: bool = True) -> None:
        """Starts every stream: looping until `stop()`, or one request each with repeat=False. Returns at once."""
        self._open()
        if not repeat:
            self._stopping.set()  # each loop ends after its first request
        self._tasks = [asyncio.create_task(self._loop(s), name=f"load-{s}") for s in range(self.streams)]

    async def run_once(self) -> LoadReport:
        """One request per stream, all concurrently; returns when every one has ended."""
        await self.start(repeat=False)
        return await self.stop()

    async def stop(self, timeout: float | None = None) -> LoadReport:
        """Lets each stream finish its current request, then closes. Safe to call twice."""
        self._stopping.set()
        if self._tasks:
            await asyncio.wait_for(asyncio.gather(*self._tasks), timeout or self.timeout + 10)
            self._tasks = []
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        return LoadReport(list(self.results), time.monotonic() - self._started_at)

    async def cancel(self) -> None:
        """Abandons every stream now (test teardown after a failure). Safe to call twice."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    # -- waiting ----------------------------------------------------------------

    async def wait_tokens(self, at_least: int, timeout: float = 60.0) -> None:
        """Waits until every stream's current request has received `at_least` tokens."""
        await self._wait(lambda: all(r is not None and not r.done and len(r.tokens) >= at_least
                                     for r in self._current), timeout, f"{at_least} tokens on every stream")

    async def wait_completed(self, count: int, timeout: float = 60.0) -> None:
        """Waits until `count` requests (over all streams) have ended, OK or not."""
        await self._wait(lambda: sum(1 for r in self.results if r.done) >= count, timeout,
                         f"{count} requests completed")

    async def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"load never reached {what} within {timeout}s: {self.snapshot()}")
            if any(t.done() for t in self._tasks):
                for task in self._tasks:
                    if task.done() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, 0.2)):
                    await self._progress.wait()

    def snapshot(self) -> str:
        done = [r for r in self.results if r.done]
        failed = [r.describe() for r in done if not r.ok]
        live = [len(r.tokens) if r is not None else -1 for r in self._current]
        return f"{len(done)} done, {len(failed)} failed {failed[:3]}, tokens of current requests {live}"

    # -- internals --------------------------------------------------------------

    def _open(self) -> None:
        if self._channel is not None:
            raise RuntimeError("a LoadGenerator runs once")
        self._channel = grpc.aio.insecure_channel(self.endpoint)
        self._started_at = time.monotonic()

    async def _loop(self, stream: int) -> None:
        assert self._channel is not None
        stub = inference_pb2_grpc.InferenceStub(self._channel)
        iteration = 0
        while True:
            await self._one(stub, stream, iteration)
            iteration += 1
            if self._stopping.is_set():
                return

    async def _one(self, stub: inference_pb2_grpc.InferenceStub, stream: int, iteration: int) -> None:
        result = StreamResult(stream, iteration, self.prompt(stream, iteration))
        self.results.append(result)
        self._current[stream] = result
        request = inference_pb2.GenerateRequest(model=self.model, prompt_token_ids=result.prompt,
                                                sampling=self.sampling)
        try:
            async for response in stub.Generate(request, timeout=self.timeout):
                result.tokens.extend(response.token_ids)
                if response.finish_reason:
                    result.finish_reason = response.finish_reason
                    result.migrations = response.route.migrations
                    result.retries = response.route.retries
                    result.prefill_worker_id = response.route.prefill_worker_id
                    result.decode_worker_id = response.route.decode_worker_id
                self._progress.set()
            if not result.finish_reason:
                result.status = grpc.StatusCode.UNKNOWN
                result.details = "stream ended without a finish reason"
        except grpc.aio.AioRpcError as exc:
            result.status = exc.code()
            result.details = exc.details() or ""
        finally:
            result.done = True
            self._progress.set()
