"""Disaggregated generation through a real KV transport equals unified generation, token for token.

Prefill engine -> KvExporter on a grpc.aio server (127.0.0.1:0) -> fetch_kv -> decode engine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from engine.base import DecodeRequest, EngineConfig, PrefillRequest, Sampling
from engine.kv.exporter import KvExporter, fetch_kv
from engine.tiny_model import ensure_tiny_checkpoint
from engine.torch_engine import TorchEngine
from tandem.v1 import worker_pb2_grpc

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    ensure_tiny_checkpoint(root)
    return root


@pytest.fixture
async def pair(cache_dir: Path) -> AsyncIterator[tuple[TorchEngine, TorchEngine, KvExporter, str]]:
    prefill = TorchEngine(EngineConfig(model="tiny", cache_dir=str(cache_dir)))
    decode = TorchEngine(EngineConfig(model="tiny", cache_dir=str(cache_dir)))
    exporter = KvExporter(host="127.0.0.1", bind_host="127.0.0.1")
    server = grpc.aio.server()
    worker_pb2_grpc.add_KvSourceServicer_to_server(exporter.servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await exporter.start()
    await prefill.start()
    await decode.start()
    try:
        yield prefill, decode, exporter, f"127.0.0.1:{port}"
    finally:
        await decode.close()
        await prefill.close()
        await exporter.close()
        await server.stop(None)
    assert exporter.open_handles == 0


async def _tokens(engine: TorchEngine, request: DecodeRequest) -> list[int]:
    return [t async for step in engine.decode(request) for t in step.token_ids]


@pytest.mark.parametrize("transport", ["grpc", "tcp", "shm"])
async def test_disaggregated_equals_unified_across_prompts(pair, transport: str) -> None:
    prefill, decode, exporter, endpoint = pair
    tokenizer = decode.tokenizer
    prompts = ["x", "héllo wörld 你好 🚀", "lorem ipsum " * 170, "ab " * 40]
    for text in prompts:
        for sampling in (Sampling.create(max_tokens=8, ignore_eos=True),
                         Sampling.create(max_tokens=8, temperature=0.7, top_p=0.95, seed=42, ignore_eos=True)):
            prompt = tuple(tokenizer.encode(text))
            unified = await _tokens(decode, DecodeRequest("u", prompt, sampling))

            result = await prefill.prefill(PrefillRequest("p", prompt, sampling))
            assert result.kv is not None
            handle = await exporter.offer(result.kv, transports=[transport], consumer_host="127.0.0.1")
            handle.source_endpoint = endpoint
            blob = await fetch_kv(handle)
            rest = await _tokens(decode, DecodeRequest("d", prompt, sampling, kv=blob,
                                                       first_token=result.first_token))

            assert [result.first_token, *rest] == unified, (transport, text[:20], sampling.temperature)
    assert exporter.open_handles == 0


def test_tiny_checkpoint_is_built_once_and_identically_by_racing_processes(tmp_path: Path) -> None:
    """Two processes build into one cache dir at once; a third build elsewhere is byte-identical."""
    script = ("import sys; from engine.tiny_model import ensure_tiny_checkpoint; "
              "print(ensure_tiny_checkpoint(sys.argv[1]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "protos")])}
    racers = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "shared")], stdout=subprocess.PIPE,
                               text=True, env=env) for _ in range(2)]
    paths = {Path(racer.communicate(timeout=120)[0].strip()) for racer in racers}
    assert all(racer.returncode == 0 for racer in racers)
    assert len(paths) == 1
    built = paths.pop()
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == [built.name]  # no temp dirs left

    elsewhere = ensure_tiny_checkpoint(tmp_path / "other")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (built / name).read_bytes() == (elsewhere / name).read_bytes(), name
