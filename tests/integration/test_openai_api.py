"""The router's OpenAI-compatible HTTP API, driven by clients nobody here wrote: the official `openai`
SDK (sync, async, streaming) and curl, against real etcd, real sim and torch workers and a real router."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest

from controlplane.supervisor import ManagedProcess
from tandem.v1 import common_pb2, inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.support.polling import wait_until
from tests.support.testbed import Testbed

pytestmark = pytest.mark.integration

SIM = ("--engine", "sim", "--model", "llama-3-8b", "--gpu-type", "H100-SXM")
DOCS = Path(__file__).resolve().parents[2] / "docs" / "http-api.md"


def base_url(router: ManagedProcess) -> str:
    port = router.info.get("http_port")
    assert port, f"the router announced no HTTP port: {router.info}"
    return f"http://127.0.0.1:{port}/v1"


def sdk(router: ManagedProcess, api_key: str = "unused") -> openai.OpenAI:
    # max_retries=0: the SDK would retry 429/503 by itself; the tests look at the first answer.
    return openai.OpenAI(base_url=base_url(router), api_key=api_key, max_retries=0, timeout=120)


def wait_model(client: openai.OpenAI, model: str, decode: int = 1) -> None:
    def ready() -> bool:
        listed = {m.id: m for m in client.models.list().data}
        return model in listed and (listed[model].model_extra or {}).get("decode_workers") == decode
    wait_until(ready, f"{model} with {decode} decode worker(s) in /v1/models")


def grpc_complete(router: ManagedProcess, request: inference_pb2.GenerateRequest) -> inference_pb2.CompleteResponse:
    with grpc.insecure_channel(router.endpoint) as channel:
        return inference_pb2_grpc.InferenceStub(channel).Complete(request, timeout=120)


def load_of(worker: ManagedProcess) -> worker_pb2.LoadReport:
    with grpc.insecure_channel(worker.endpoint) as channel:
        return worker_pb2_grpc.WorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=5)


@pytest.fixture(scope="module")
def sim_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    bed = Testbed(tmp_path_factory.mktemp("openai-sim"))
    try:
        bed.start("p0", "prefill_svc", *SIM, "--speedup", "1000")
        bed.start("d0", "decode_svc", *SIM, "--speedup", "1000")
        bed.start("router", "router_svc", "--http-listen", "127.0.0.1:0", "--max-output-tokens", "512",
                  "--metrics-listen", "127.0.0.1:0", "--log-format", "json")
        wait_model(sdk(bed.children["router"]), "llama-3-8b")
        yield bed
    finally:
        assert bed.close() == [], "children left running"


@pytest.fixture
def sim_router(sim_fleet: Testbed) -> ManagedProcess:
    return sim_fleet.children["router"]


# -- completions against the sim engine ------------------------------------------------------


def test_models_lists_the_served_model_with_its_limits(sim_router: ManagedProcess) -> None:
    models = sdk(sim_router).models.list().data
    assert [m.id for m in models] == ["llama-3-8b"]
    extra = models[0].model_extra or {}
    assert extra["max_output_tokens"] == 512 and extra["max_model_len"] > 512 and extra["chat"] is False


def test_one_model_can_be_retrieved_by_name(sim_router: ManagedProcess) -> None:
    client = sdk(sim_router)
    assert client.models.retrieve("llama-3-8b").id == "llama-3-8b"
    with pytest.raises(openai.NotFoundError, match="unknown model"):
        client.models.retrieve("nope")


def test_sync_completion_has_text_usage_and_the_finish_reason(sim_router: ManagedProcess) -> None:
    answer = sdk(sim_router).completions.create(model="llama-3-8b", prompt="hello there", max_tokens=12,
                                                extra_body={"ignore_eos": True})
    assert answer.object == "text_completion" and answer.model == "llama-3-8b"
    choice = answer.choices[0]
    assert choice.finish_reason == "length" and choice.text
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (11, 12, 23)


def test_streamed_text_equals_the_non_streamed_text_and_the_grpc_apis(sim_router: ManagedProcess) -> None:
    client = sdk(sim_router)
    for sampling in ({"temperature": 0.0}, {"temperature": 0.9, "seed": 1234}):
        kwargs: dict[str, Any] = {"model": "llama-3-8b", "prompt": "the same request " * 4, "max_tokens": 24,
                                  "top_p": 0.95, **sampling}
        whole = client.completions.create(**kwargs, extra_body={"ignore_eos": True})
        chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True}))
        streamed = "".join(c.choices[0].text for c in chunks if c.choices)
        assert streamed == whole.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 24  # type: ignore[union-attr]
        assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
        params = common_pb2.SamplingParams(max_tokens=24, top_p=0.95, ignore_eos=True, **sampling)
        via_grpc = grpc_complete(sim_router, inference_pb2.GenerateRequest(
            model="llama-3-8b", prompt=kwargs["prompt"], sampling=params))
        assert via_grpc.text == whole.choices[0].text


def test_a_stop_string_ends_the_answer_before_it(sim_router: ManagedProcess) -> None:
    client = sdk(sim_router)
    text = client.completions.create(model="llama-3-8b", prompt="pick", max_tokens=40, seed=3, temperature=1.0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = text[10:12]
    answer = client.completions.create(model="llama-3-8b", prompt="pick", max_tokens=40, seed=3, temperature=1.0,
                                       stop=[stop, "\u2603never"], extra_body={"ignore_eos": True})
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].text == text[:text.index(stop)]


async def test_async_clients_run_concurrently_and_each_gets_its_answer(sim_router: ManagedProcess) -> None:
    client = openai.AsyncOpenAI(base_url=base_url(sim_router), api_key="unused", max_retries=0)
    async with client:
        answers = await asyncio.gather(*(client.completions.create(
            model="llama-3-8b", prompt=f"request {i}", max_tokens=8 + i, extra_body={"ignore_eos": True})
            for i in range(6)))
        assert [a.usage.completion_tokens for a in answers] == [8 + i for i in range(6)]  # type: ignore[union-attr]
        stream = await client.completions.create(model="llama-3-8b", prompt="async stream", max_tokens=5,
                                                 stream=True, extra_body={"ignore_eos": True})
        pieces = [chunk async for chunk in stream]
        assert pieces[-1].choices[0].finish_reason == "length"


def test_the_request_id_is_the_answers_id_and_the_clients_own_when_given(sim_router: ManagedProcess) -> None:
    raw = sdk(sim_router).completions.with_raw_response.create(
        model="llama-3-8b", prompt="x", max_tokens=2, extra_headers={"X-Request-Id": "my-trace-42"})
    assert raw.headers["x-request-id"] == "my-trace-42" and raw.parse().id == "cmpl-my-trace-42"


def test_metrics_and_json_logs_carry_the_http_requests_id(sim_router: ManagedProcess) -> None:
    import httpx

    client = sdk(sim_router)
    list(client.completions.create(model="llama-3-8b", prompt="streamed", max_tokens=3, stream=True))
    # The last request observed: each histogram bucket keeps its latest exemplar.
    client.completions.create(model="llama-3-8b", prompt="traced", max_tokens=2,
                              extra_headers={"X-Request-Id": "trace-ok-1"})
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", extra_headers={"X-Request-Id": "trace-refused-2"})
    metrics = httpx.get(f"http://127.0.0.1:{sim_router.info['metrics_port']}/metrics",
                        headers={"Accept": "application/openmetrics-text"}).text
    # A stream read to its end counts as OK, not as a request its client gave up on.
    assert 'tandem_router_requests_total{model="llama-3-8b",status="OK"}' in metrics
    assert 'status="CANCELLED"' not in metrics
    assert re.search(r'tandem_router_request_seconds_bucket\{[^}]*model="llama-3-8b"[^}]*\} [0-9.e+]+ '
                     r'# \{request_id="trace-ok-1"\}', metrics), "no exemplar with the request id"
    assert 'tandem_router_http_requests_total{path="/v1/completions",status="404"}' in metrics
    lines = [json.loads(line) for line in sim_router.log_path.read_text().splitlines() if line.startswith("{")]
    assert any(line.get("request_id") == "trace-refused-2" and "unknown model" in line["msg"] for line in lines)


@pytest.mark.parametrize(("kwargs", "error", "needle"), [
    ({"model": "nope", "prompt": "x"}, openai.NotFoundError, "unknown model"),
    ({"model": "llama-3-8b", "prompt": "x", "max_tokens": 513}, openai.BadRequestError, "max_tokens must be 1..512"),
    ({"model": "llama-3-8b", "prompt": "x", "temperature": -1}, openai.BadRequestError, "temperature must be"),
    ({"model": "llama-3-8b", "prompt": "x", "n": 2}, openai.BadRequestError, "n must be 1"),
    ({"model": "llama-3-8b", "prompt": "x", "logprobs": 2}, openai.BadRequestError, "logprobs is not supported"),
    ({"model": "llama-3-8b", "prompt": ["a", "b"]}, openai.BadRequestError, "one request takes one prompt"),
    ({"model": "llama-3-8b", "prompt": ""}, openai.BadRequestError, "prompt is empty"),
])
def test_bad_completions_raise_the_sdks_exception_types(sim_router: ManagedProcess, kwargs: dict[str, Any],
                                                         error: type[openai.APIStatusError], needle: str) -> None:
    with pytest.raises(error) as info:
        sdk(sim_router).completions.create(**kwargs)
    assert needle in info.value.message
    body = info.value.body
    assert isinstance(body, dict) and needle in body["message"] and body["type"] and "code" in body


def test_malformed_http_gets_openai_shaped_errors(sim_router: ManagedProcess) -> None:
    import httpx

    root = base_url(sim_router)
    cases = [
        (httpx.post(root + "/completions", content=b"{not json"), 400, "not valid JSON"),
        (httpx.post(root + "/completions", json=["a", "list"]), 400, "must be a JSON object"),
        (httpx.get(root + "/no/such/thing"), 404, "no such endpoint: GET /v1/no/such/thing"),
        (httpx.get(root + "/completions"), 405, "no such endpoint"),
    ]
    for response, status, needle in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert needle in error["message"] and error["type"] and response.headers["x-request-id"]


def test_a_streamed_bad_request_is_refused_before_any_event(sim_router: ManagedProcess) -> None:
    with pytest.raises(openai.NotFoundError):
        sdk(sim_router).completions.create(model="nope", prompt="x", stream=True)


def test_a_chat_for_a_model_without_a_template_is_a_clear_400(sim_router: ManagedProcess) -> None:
    with pytest.raises(openai.BadRequestError, match="has no chat template"):
        sdk(sim_router).chat.completions.create(model="llama-3-8b", messages=[{"role": "user", "content": "hi"}])


def test_health_is_200_while_a_model_is_routable(sim_router: ManagedProcess) -> None:
    import httpx

    response = httpx.get(base_url(sim_router).removesuffix("/v1") + "/health")
    assert response.status_code == 200 and response.json()["models"] == ["llama-3-8b"]


def test_api_keys_from_a_file_rotate_without_a_restart(sim_fleet: Testbed, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("sk-first\n")
    router = sim_fleet.start("router-keys", "router_svc", "--http-listen", "127.0.0.1:0",
                             "--http-api-keys-file", str(keys))
    try:
        with pytest.raises(openai.AuthenticationError, match="API key"):
            sdk(router, "sk-wrong").models.list()
        assert sdk(router, "sk-first").completions.create(model="llama-3-8b", prompt="x", max_tokens=2).choices
        new = tmp_path / "keys.new"
        new.write_text("sk-second\n")
        os.replace(new, keys)
        with pytest.raises(openai.AuthenticationError):
            sdk(router, "sk-first").models.list()
        assert sdk(router, "sk-second").models.list().data
        log = (sim_fleet.root / "logs").glob("router-keys*")
        assert not any("sk-first" in p.read_text(errors="replace") or "sk-second" in p.read_text(errors="replace")
                       for p in log)
    finally:
        router.stop()


def test_a_router_with_a_tls_certificate_serves_https(sim_fleet: Testbed, tmp_path: Path) -> None:
    import httpx

    from runtime.peers import PeerTls
    from tests.integration.test_internal_tls import make_ca_and_cert

    ca, cert, key = make_ca_and_cert(tmp_path)
    router = sim_fleet.start("router-tls", "router_svc", "--http-listen", "127.0.0.1:0", "--tls-cert", str(cert),
                             "--tls-key", str(key), tls=PeerTls(ca))
    try:
        url = base_url(router).replace("http://", "https://")
        import ssl

        with httpx.Client(verify=ssl.create_default_context(cafile=str(ca))) as http:
            client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, http_client=http)
            assert client.completions.create(model="llama-3-8b", prompt="secure", max_tokens=3).choices[0].text
        with pytest.raises(httpx.HTTPError):
            httpx.get(base_url(router) + "/models")  # plain HTTP on the HTTPS port
    finally:
        router.stop()


# -- backpressure, lost workers and lost clients ----------------------------------------------


@pytest.fixture
def slow_fleet(tmp_path: Path) -> Iterator[Testbed]:
    """One sim decode worker that takes one sequence at a time, in simulated real time (slow)."""
    bed = Testbed(tmp_path)
    try:
        bed.start("d0", "decode_svc", *SIM, "--speedup", "0.1", "--max-batch-size", "1")
        bed.start("router", "router_svc", "--http-listen", "127.0.0.1:0", "--capacity-wait-s", "0.3")
        wait_model(sdk(bed.children["router"]), "llama-3-8b")
        yield bed
    finally:
        assert bed.close() == [], "children left running"


def test_a_full_fleet_answers_429_with_retry_after_and_a_client_that_leaves_frees_its_sequence(
        slow_fleet: Testbed) -> None:
    router, d0 = slow_fleet.children["router"], slow_fleet.children["d0"]
    client = sdk(router)
    # Thousands of tokens in simulated real time: this sequence would hold the worker for minutes.
    stream = client.completions.create(model="llama-3-8b", prompt="occupy", max_tokens=4000, stream=True,
                                       extra_body={"ignore_eos": True})
    first = next(iter(stream))
    assert first.choices[0].text is not None
    wait_until(lambda: load_of(d0).active_sequences == 1, "the worker runs the streamed sequence")
    with pytest.raises(openai.RateLimitError) as info:
        client.completions.create(model="llama-3-8b", prompt="no room", max_tokens=4)
    assert int(info.value.response.headers["retry-after"]) >= 1
    assert "full" in info.value.message or "busy" in info.value.message
    stream.close()  # the client goes away mid-stream
    wait_until(lambda: (load_of(d0).active_sequences, load_of(d0).active_requests) == (0, 0),
               "the worker freed the abandoned sequence")
    assert client.completions.create(model="llama-3-8b", prompt="room again", max_tokens=2).choices


def test_a_non_streaming_client_that_leaves_frees_its_sequence_too(slow_fleet: Testbed) -> None:
    import socket

    router, d0 = slow_fleet.children["router"], slow_fleet.children["d0"]
    body = json.dumps({"model": "llama-3-8b", "prompt": "long", "max_tokens": 4000, "ignore_eos": True}).encode()
    port = int(router.info["http_port"])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_until(lambda: load_of(d0).active_sequences == 1, "the worker runs the sequence")
    # The socket is closed with the answer minutes away.
    wait_until(lambda: (load_of(d0).active_sequences, load_of(d0).active_requests) == (0, 0),
               "the worker freed the abandoned sequence")


def test_no_worker_for_a_model_is_503_with_retry_after_and_health_says_so(slow_fleet: Testbed) -> None:
    import httpx

    router = slow_fleet.children["router"]
    slow_fleet.children["d0"].stop()
    root = base_url(router).removesuffix("/v1")
    wait_until(lambda: httpx.get(root + "/health").status_code == 503, "/health turns 503")
    with pytest.raises(openai.InternalServerError) as info:
        sdk(router).completions.create(model="llama-3-8b", prompt="anyone?", max_tokens=4)
    assert info.value.status_code == 503 and int(info.value.response.headers["retry-after"]) >= 1


# -- chat against a real model (torch engine, the built-in tiny model with its chat template) --------


@pytest.fixture(scope="module")
def torch_router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    bed = Testbed(tmp_path_factory.mktemp("openai-torch"))
    try:
        bed.start("d0", "decode_svc", "--engine", "torch", "--model", "tiny")
        router = bed.start("router", "router_svc", "--http-listen", "127.0.0.1:0")
        wait_model(sdk(router), "tiny")
        yield router
    finally:
        assert bed.close() == [], "children left running"


CHAT = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "héllo, who are you?"}]


def test_chat_stream_equals_chat_answer_equals_the_grpc_apis(torch_router: ManagedProcess) -> None:
    client = sdk(torch_router)
    assert (client.models.list().data[0].model_extra or {})["chat"] is True
    for sampling in ({"temperature": 0.0}, {"temperature": 0.8, "seed": 7}):
        whole = client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=16,  # type: ignore[arg-type]
                                               extra_body={"ignore_eos": True}, **sampling)
        message = whole.choices[0].message
        assert message.role == "assistant" and message.content and whole.object == "chat.completion"
        assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 16  # type: ignore[union-attr]
        chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16, stream=True,  # type: ignore[arg-type]
                                                     extra_body={"ignore_eos": True}, **sampling))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
        params = common_pb2.SamplingParams(max_tokens=16, ignore_eos=True, **sampling)
        via_grpc = grpc_complete(torch_router, inference_pb2.GenerateRequest(
            model="tiny", sampling=params, messages=[inference_pb2.ChatMessage(**m) for m in CHAT]))
        assert via_grpc.text == message.content


async def test_async_chat_streams(torch_router: ManagedProcess) -> None:
    async with openai.AsyncOpenAI(base_url=base_url(torch_router), api_key="unused", max_retries=0) as client:
        stream = await client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, stream=True,  # type: ignore[arg-type]
                                                      stream_options={"include_usage": True},
                                                      extra_body={"ignore_eos": True})
        chunks = [c async for c in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-2].choices[0].finish_reason == "length"


def test_add_generation_prompt_false_leaves_the_assistants_turn_closed(torch_router: ManagedProcess) -> None:
    client = sdk(torch_router)
    opened = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=1)  # type: ignore[arg-type]
    closed = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=1,  # type: ignore[arg-type]
                                            extra_body={"add_generation_prompt": False})
    assert opened.usage.prompt_tokens > closed.usage.prompt_tokens  # type: ignore[union-attr]


# -- the docs' curl examples, as written ------------------------------------------------------


def doc_commands() -> list[str]:
    """Every shell block of docs/http-api.md that runs curl, joined across line continuations."""
    blocks = re.findall(r"```sh\n(.*?)```", DOCS.read_text(), flags=re.S)
    return [block.replace("\\\n", " ").strip() for block in blocks if block.lstrip().startswith("curl")]


def test_the_docs_curl_and_sdk_examples_work_as_written(torch_router: ManagedProcess) -> None:
    commands = doc_commands()
    assert len(commands) >= 4, "docs/http-api.md lost its curl examples"
    port = str(torch_router.info["http_port"])
    for command in commands:
        # The docs show `tandemctl up`'s defaults: its HTTP port and its default model.
        command = command.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace("smollm2-135m", "tiny")
        argv = shlex.split(command)
        assert argv[0] == "curl"
        run = subprocess.run([*argv, "--silent", "--show-error", "--fail-with-body", "--max-time", "120"],
                             capture_output=True, text=True, timeout=150)
        assert run.returncode == 0, f"{command}\n{run.stdout}\n{run.stderr}"
        if "stream" in command and '"stream": true' in command:
            assert run.stdout.rstrip().endswith("data: [DONE]"), run.stdout
        else:
            json.loads(run.stdout)
    import sys

    snippets = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert snippets, "docs/http-api.md lost its SDK example"
    for code in snippets:
        code = code.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace("smollm2-135m", "tiny")
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=150)
        assert run.returncode == 0 and run.stdout.strip(), f"{code}\n{run.stdout}\n{run.stderr}"


# -- tandemctl up ------------------------------------------------------------------------------


def test_tandemctl_up_serves_the_openai_api_and_prints_working_examples(tmp_path: Path) -> None:
    import signal
    import sys

    state_dir = tmp_path / "factory"
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "controlplane.cli", "up", "--engine", "torch", "--model", "tiny",
             "--prefill", "0", "--decode", "1", "--state-dir", str(state_dir), "--lease-ttl", "2",
             "--router-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        state: dict[str, Any] = {}
        try:
            def up_state() -> dict[str, Any]:
                assert up.poll() is None, log_path.read_text()
                path = state_dir / "up.json"
                loaded = json.loads(path.read_text()) if path.exists() else {}
                return loaded if loaded.get("status") == "up" and "Ctrl-C" in log_path.read_text() else {}

            state = wait_until(up_state, "tandemctl up is up", timeout=240)
            url = state["openai"]
            output = log_path.read_text()
            assert url.startswith("http://127.0.0.1:") and url.endswith("/v1") and url in output
            client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
            wait_model(client, "tiny")
            chat = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8)  # type: ignore[arg-type]
            assert chat.choices[0].message.content is not None and chat.usage is not None
            assert list(client.completions.create(model="tiny", prompt="hi", max_tokens=4, stream=True))
            printed = [line.strip() for line in output.splitlines() if line.strip().startswith(("curl ", "python -c"))]
            assert len(printed) == 2, output
            curl = subprocess.run([*shlex.split(printed[0]), "--silent", "--fail-with-body"], capture_output=True,
                                  text=True, timeout=120)
            assert curl.returncode == 0 and json.loads(curl.stdout)["choices"], curl.stdout + curl.stderr
            python = shlex.split(printed[1])
            sdk_run = subprocess.run([sys.executable, *python[1:]], capture_output=True, text=True, timeout=120)
            assert sdk_run.returncode == 0, sdk_run.stderr
        finally:
            if up.poll() is None:
                up.send_signal(signal.SIGINT)
                try:
                    up.wait(60)
                except subprocess.TimeoutExpired:
                    # Only a factory that did not stop in order leaves children to kill.
                    os.killpg(up.pid, signal.SIGKILL)
                    for pid in state.get("pids", {}).values():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
        assert up.returncode == 0, log_path.read_text()
