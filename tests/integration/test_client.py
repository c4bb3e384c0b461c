"""The client library against a real grpc.aio Inference server on 127.0.0.1:0.

The servicer here is a small scripted stand-in for a router: each call takes
the next behaviour from its script. What is under test is the client:
streaming, retries only before the first response, deadlines, cancellation.
The server runs on its own event loop in a thread, so the sync client can
block in the test's thread.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from router_svc.client import AsyncTandemClient, RetryPolicy, TandemClient, TandemError
from router_svc.client_errors import retry_after_of, retry_hint_metadata
from tandem.v1 import common_pb2, inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.integration

WAIT_S = 10.0
FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05)


class ScriptedInference(inference_pb2_grpc.InferenceServicer):
    """Generate streams the prompt's words back; `script` bends the next calls."""

    def __init__(self, script: list[str] | None = None) -> None:
        self.script = list(script or [])
        self.requests: list[inference_pb2.GenerateRequest] = []
        self.time_remaining: list[float | None] = []
        self.metadata: list[dict[str, str]] = []
        self.started = threading.Event()
        self.cancelled = threading.Event()

    def _next(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> str:
        self.requests.append(request)
        self.time_remaining.append(context.time_remaining())
        self.metadata.append({k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)})
        # Where the cancellation lands (in the hang, or while grpc is still
        # writing the previous chunk) is a race; the call's end is not.
        context.add_done_callback(self._note_end)
        return self.script.pop(0) if self.script else "ok"

    def _note_end(self, context: grpc.aio.ServicerContext) -> None:
        if context.cancelled():
            self.cancelled.set()

    async def _fail(self, behaviour: str, context: grpc.aio.ServicerContext) -> None:
        if behaviour == "unavailable":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no worker serves model 'm' now")
        if behaviour == "exhausted":
            context.set_trailing_metadata(retry_hint_metadata(0.02))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "every decode worker is busy; retry after 0.02s")
        if behaviour == "invalid":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must be 1..8192, got 0")

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        behaviour = self._next(request, context)
        await self._fail(behaviour, context)
        words = request.prompt.split()
        route = inference_pb2.RouteInfo(decode_worker_id="d1", prefill_worker_id="p1", reason="expected-time")
        for i, word in enumerate(words):
            yield inference_pb2.GenerateResponse(
                request_id=request.request_id, text=word + " ", token_ids=[i], route=route if i == 0 else None
            )
            if behaviour == "fail-after-first":
                await context.abort(grpc.StatusCode.UNAVAILABLE, "worker lost")
            if behaviour == "hang":
                self.started.set()
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    self.cancelled.set()
                    raise
        yield inference_pb2.GenerateResponse(
            request_id=request.request_id,
            finish_reason=common_pb2.FINISH_REASON_LENGTH,
            usage=common_pb2.Usage(prompt_tokens=len(words), completion_tokens=len(words)),
            timings=common_pb2.Timings(ttft_ms=1.5, e2e_ms=3.0),
            route=route,
        )

    async def Complete(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.CompleteResponse:
        behaviour = self._next(request, context)
        await self._fail(behaviour, context)
        return inference_pb2.CompleteResponse(
            request_id=request.request_id, text=request.prompt.upper(), token_ids=[1, 2],
            finish_reason=common_pb2.FINISH_REASON_STOP_STRING,
        )

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        return inference_pb2.ListModelsResponse(models=[
            inference_pb2.ModelInfo(name="m", max_context_tokens=8192, max_output_tokens=1024, prefill_workers=2,
                                    decode_workers=3),
        ])


class ServerThread:
    """A grpc.aio server on its own loop in a daemon thread."""

    def __init__(self, servicer: ScriptedInference, credentials: grpc.ServerCredentials | None = None) -> None:
        self.servicer = servicer
        self._credentials = credentials
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = 0

    async def _start(self) -> None:
        self.server = grpc.aio.server()
        inference_pb2_grpc.add_InferenceServicer_to_server(self.servicer, self.server)
        if self._credentials is not None:
            self.port = self.server.add_secure_port("127.0.0.1:0", self._credentials)
        else:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()

    def start(self) -> ServerThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(WAIT_S)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(WAIT_S)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(WAIT_S)
        self.loop.close()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def router() -> Iterator[ServerThread]:
    server = ServerThread(ScriptedInference()).start()
    yield server
    server.stop()


@pytest.fixture
def second_router() -> Iterator[ServerThread]:
    server = ServerThread(ScriptedInference()).start()
    yield server
    server.stop()


def dead_target() -> str:
    """host:port where nothing listens (connections are refused: UNAVAILABLE)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


# -- sync client -----------------------------------------------------------------


def test_generate_streams_chunks_with_the_final_accounting(router: ServerThread) -> None:
    with TandemClient(router.target, retry=FAST_RETRY, metadata=[("x-team", "search")]) as client:
        chunks = list(client.generate("the quick brown fox", model="m", max_tokens=4, temperature=0.5,
                                      stop=["\n"], seed=3))
    assert "".join(c.text for c in chunks) == "the quick brown fox "
    assert [c.token_ids for c in chunks[:-1]] == [(0,), (1,), (2,), (3,)]
    last = chunks[-1]
    assert last.finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])
    assert last.usage is not None and last.usage.completion_tokens == 4
    assert last.timings is not None and last.timings.ttft_ms == 1.5
    assert chunks[0].route is not None and chunks[0].route.reason == "expected-time"
    sent = router.servicer.requests[0]
    assert (sent.model, sent.sampling.max_tokens, sent.sampling.seed, list(sent.sampling.stop)) == ("m", 4, 3, ["\n"])
    assert sent.sampling.temperature == pytest.approx(0.5) and not sent.sampling.HasField("top_p")
    assert len(sent.request_id) == 32 and {c.request_id for c in chunks} == {sent.request_id}
    assert router.servicer.metadata[0]["x-team"] == "search"


def test_token_ids_prompt_complete_and_list_models(router: ServerThread) -> None:
    with TandemClient(router.target) as client:
        done = client.complete("hi there", model="m", request_id="mine-1")
        assert (done.text, done.token_ids, done.finish_reason, done.request_id) == ("HI THERE", (1, 2),
                                                                                     "stop_string", "mine-1")
        list(client.generate(token_ids=[5, 6], model="m"))
        assert list(router.servicer.requests[-1].prompt_token_ids) == [5, 6]
        [model] = client.list_models()
        assert (model.name, model.max_context_tokens, model.decode_workers) == ("m", 8192, 3)
        with pytest.raises(ValueError, match="exactly one of prompt, token_ids and messages"):
            client.generate("x", token_ids=[1], model="m")


def test_unavailable_before_the_first_token_is_retried_with_the_same_request_id(router: ServerThread) -> None:
    router.servicer.script = ["unavailable", "unavailable"]
    with TandemClient(router.target, retry=FAST_RETRY) as client:
        stream = client.generate("a b", model="m")
        assert stream.text() == "a b "
    assert stream.attempts == 3
    assert len({r.request_id for r in router.servicer.requests}) == 1 and len(router.servicer.requests) == 3


def test_retries_move_to_the_next_target(router: ServerThread) -> None:
    with TandemClient([dead_target(), router.target], retry=FAST_RETRY) as client:
        assert client.generate("ok", model="m").text() == "ok "
        assert client.complete("ok", model="m").text == "OK"


def test_attempts_are_bounded(router: ServerThread) -> None:
    router.servicer.script = ["unavailable"] * 5
    with TandemClient(router.target, retry=FAST_RETRY) as client, pytest.raises(TandemError) as err:
        list(client.generate("a", model="m"))
    assert err.value.code is grpc.StatusCode.UNAVAILABLE and err.value.attempts == 3
    assert "no worker serves model 'm'" in err.value.message
    assert len(router.servicer.requests) == 3


def test_no_retry_once_a_token_has_arrived(router: ServerThread) -> None:
    router.servicer.script = ["fail-after-first"]
    with TandemClient(router.target, retry=FAST_RETRY) as client:
        stream = client.generate("a b c", model="m")
        assert next(stream).text == "a "
        with pytest.raises(TandemError) as err:
            next(stream)
    assert err.value.code is grpc.StatusCode.UNAVAILABLE and err.value.message == "worker lost"
    assert len(router.servicer.requests) == 1


def test_invalid_argument_is_surfaced_at_once(router: ServerThread) -> None:
    router.servicer.script = ["invalid"]
    with TandemClient(router.target, retry=FAST_RETRY) as client, pytest.raises(TandemError) as err:
        client.complete("a", model="m")
    assert str(err.value) == "INVALID_ARGUMENT: max_tokens must be 1..8192, got 0"
    assert len(router.servicer.requests) == 1


def test_resource_exhausted_is_surfaced_with_its_hint_unless_retries_are_wanted(router: ServerThread) -> None:
    router.servicer.script = ["exhausted"]
    with TandemClient(router.target, retry=FAST_RETRY) as client, pytest.raises(TandemError) as err:
        list(client.generate("a", model="m"))
    assert err.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED and err.value.retry_after_s == 0.02

    router.servicer.script = ["exhausted"]
    patient = RetryPolicy(max_attempts=2, retry_resource_exhausted=True)
    with TandemClient(router.target, retry=patient) as client:
        assert client.generate("a", model="m").text() == "a "


def test_the_deadline_reaches_the_server_and_ends_the_call(router: ServerThread) -> None:
    with TandemClient(router.target, timeout=30.0) as client:
        list(client.generate("a", model="m"))
        remaining = router.servicer.time_remaining[-1]
        # grpc rounds the deadline it sends up, so allow a little over.
        assert remaining is not None and 0 < remaining <= 31.0

        router.servicer.script = ["hang"]
        with pytest.raises(TandemError) as err:
            list(client.generate("a b", model="m", timeout=0.5))
    assert err.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert router.servicer.cancelled.wait(WAIT_S)


@pytest.mark.parametrize("how", ["cancel", "with-block", "close"])
def test_leaving_a_stream_cancels_the_server_side_call(router: ServerThread, how: str) -> None:
    router.servicer.script = ["hang"]
    with TandemClient(router.target) as client:
        stream = client.generate("a b c", model="m")
        if how == "with-block":
            with stream:
                assert next(stream).text == "a "
        else:
            assert next(stream).text == "a "
            if how == "cancel":
                stream.cancel()
            else:
                stream.close()
        assert router.servicer.cancelled.wait(WAIT_S)
        assert list(stream) == []  # a cancelled stream just ends


def test_cancel_from_another_thread_ends_the_iteration(router: ServerThread) -> None:
    router.servicer.script = ["hang"]
    with TandemClient(router.target) as client:
        stream = client.generate("a b", model="m")
        assert next(stream).text == "a "

        def cancel_later() -> None:
            router.servicer.started.wait(WAIT_S)
            stream.cancel()

        threading.Thread(target=cancel_later).start()
        assert list(stream) == []
    assert router.servicer.cancelled.wait(WAIT_S)


def test_tls_with_a_private_root(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make a test certificate: apt-get install openssl (.ci/run does)")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    server = ServerThread(ScriptedInference(), credentials=creds).start()
    try:
        with TandemClient(server.target, root_certificates=cert) as client:
            assert client.generate("secure", model="m").text() == "secure "
        with TandemClient(server.target, retry=FAST_RETRY) as plain, pytest.raises(TandemError) as err:
            plain.list_models(timeout=5)
        assert err.value.code is grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_retry_hint_parsing() -> None:
    assert retry_after_of("busy", retry_hint_metadata(1.5)) == 1.5
    assert retry_after_of("busy; retry after 2s", None) == 2.0
    assert retry_after_of("busy; Retry after 250 ms", ()) == 0.25
    assert retry_after_of("busy", None) is None


# -- async client -----------------------------------------------------------------


async def test_async_generate_complete_and_list_models(router: ServerThread) -> None:
    async with AsyncTandemClient(router.target, retry=FAST_RETRY) as client:
        chunks = [c async for c in client.generate("one two", model="m", max_tokens=2)]
        assert "".join(c.text for c in chunks) == "one two " and chunks[-1].finish_reason == "length"
        assert (await client.complete("x", model="m")).text == "X"
        assert [m.name for m in await client.list_models()] == ["m"]


async def test_async_retries_before_the_first_token_only(router: ServerThread, second_router: ServerThread) -> None:
    router.servicer.script = ["unavailable"]
    async with AsyncTandemClient([router.target, second_router.target], retry=FAST_RETRY) as client:
        stream = client.generate("a b", model="m")
        assert await stream.text() == "a b "
        assert stream.attempts == 2

        router.servicer.script = second_router.servicer.script = ["fail-after-first"]
        stream = client.generate("a b", model="m")
        assert (await stream.__anext__()).text == "a "
        with pytest.raises(TandemError, match="UNAVAILABLE: worker lost"):
            await stream.__anext__()
        assert stream.attempts == 1


@pytest.mark.parametrize("how", ["async-with", "cancel", "task-cancel"])
async def test_async_leaving_a_stream_cancels_the_server_side_call(router: ServerThread, how: str) -> None:
    router.servicer.script = ["hang"]
    async with AsyncTandemClient(router.target) as client:
        stream = client.generate("a b c", model="m")
        if how == "async-with":
            async with stream:
                assert (await stream.__anext__()).text == "a "
        elif how == "cancel":
            assert (await stream.__anext__()).text == "a "
            stream.cancel()
            assert [c async for c in stream] == []
        else:
            async def consume() -> None:
                async for _ in stream:
                    pass

            task = asyncio.create_task(consume())
            assert await asyncio.to_thread(router.servicer.started.wait, WAIT_S)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert await asyncio.to_thread(router.servicer.cancelled.wait, WAIT_S)


async def test_async_deadline_exceeded(router: ServerThread) -> None:
    router.servicer.script = ["hang"]
    async with AsyncTandemClient(router.target, timeout=0.5) as client:
        with pytest.raises(TandemError) as err:
            await client.generate("a b", model="m").text()
    assert err.value.code is grpc.StatusCode.DEADLINE_EXCEEDED


# -- the examples in docs/client.md run as written ------------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "client.md"


def test_documented_examples_run(router: ServerThread) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 2
    for block in blocks:
        code = block.replace("localhost:50051", router.target).replace("llama-3-8b", "m").replace("smollm2-135m", "m")
        exec(compile(code, str(DOC), "exec"), {"__name__": "__doc_example__"})
