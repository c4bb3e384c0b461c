"""The torch engine on the tiny model: generation, stop rules, sampling determinism, migration, lifecycle."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engine.base import (
    DecodeRequest,
    EngineConfig,
    EngineError,
    FinishReason,
    InvalidRequest,
    KvMismatch,
    PrefillRequest,
    Sampling,
    create_engine,
)
from engine.tiny_model import ensure_tiny_checkpoint
from engine.torch_engine import TorchEngine

PROMPTS = [
    "a",
    "héllo wörld 你好 🚀",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def main():\n    return 0\n",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    ensure_tiny_checkpoint(root)
    return root


@pytest.fixture
async def engine(cache_dir: Path) -> AsyncIterator[TorchEngine]:
    engine = TorchEngine(EngineConfig(model="tiny", cache_dir=str(cache_dir), max_batch_size=4))
    await engine.start()
    yield engine
    await engine.close()
    assert engine.stats().active_sequences == 0


async def generate(engine: TorchEngine, prompt: tuple[int, ...], sampling: Sampling,
                   **fields: object) -> tuple[list[int], str | None]:
    tokens: list[int] = []
    finish = None
    async for step in engine.decode(DecodeRequest("r", prompt, sampling, **fields)):  # type: ignore[arg-type]
        tokens += step.token_ids
        finish = step.finish_reason
    return tokens, finish


def encode(engine: TorchEngine, text: str) -> tuple[int, ...]:
    return tuple(engine.tokenizer.encode(text))


async def test_create_engine_by_name_builds_a_torch_engine(cache_dir: Path) -> None:
    engine = create_engine("torch", EngineConfig(model="tiny", cache_dir=str(cache_dir)))
    assert isinstance(engine, TorchEngine)
    await engine.close()  # never started: still fine


async def test_layout_and_limits_describe_the_tiny_model(engine: TorchEngine) -> None:
    layout = engine.layout
    assert (layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.dtype) == (2, 2, 16, "float32")
    assert engine.max_context_tokens == 4096
    assert engine.model_name == "tiny"
    assert engine.tokenizer.decode(list(encode(engine, PROMPTS[1]))) == PROMPTS[1]


@pytest.mark.parametrize("text", PROMPTS)
async def test_prefill_then_decode_equals_local_generation(engine: TorchEngine, text: str) -> None:
    prompt = encode(engine, text)
    sampling = Sampling.create(max_tokens=12, ignore_eos=True)
    unified, finish = await generate(engine, prompt, sampling)

    result = await engine.prefill(PrefillRequest("p", prompt, sampling))
    assert result.kv is not None and result.kv.num_tokens == len(prompt)
    rest, rest_finish = await generate(engine, prompt, sampling, kv=result.kv, first_token=result.first_token)

    assert [result.first_token, *rest] == unified
    assert finish == rest_finish == FinishReason.LENGTH


async def test_seeded_sampling_is_reproducible_and_position_based(engine: TorchEngine) -> None:
    prompt = encode(engine, PROMPTS[2])
    sampling = Sampling.create(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    first, _ = await generate(engine, prompt, sampling)
    again, _ = await generate(engine, prompt, sampling)
    other, _ = await generate(engine, prompt, Sampling.create(**{**sampling.__dict__, "seed": 99}))

    result = await engine.prefill(PrefillRequest("p", prompt, sampling))
    rest, _ = await generate(engine, prompt, sampling, kv=result.kv, first_token=result.first_token)

    assert first == again == [result.first_token, *rest]
    assert other != first


@pytest.mark.parametrize("temperature", [0.0, 0.8])
async def test_migrated_sequence_continues_exactly(engine: TorchEngine, temperature: float) -> None:
    prompt = encode(engine, PROMPTS[1])
    sampling = Sampling.create(max_tokens=14, temperature=temperature, seed=7, ignore_eos=True)
    whole, finish = await generate(engine, prompt, sampling)

    delivered = tuple(whole[:5])
    resumed, resumed_finish = await generate(engine, prompt, sampling, generated=delivered)

    assert [*delivered, *resumed] == whole
    assert resumed_finish == finish


async def test_migration_onto_an_imported_prompt_cache(engine: TorchEngine) -> None:
    prompt = encode(engine, PROMPTS[3])
    sampling = Sampling.create(max_tokens=10, ignore_eos=True)
    whole, _ = await generate(engine, prompt, sampling)
    result = await engine.prefill(PrefillRequest("p", prompt, sampling))

    resumed, _ = await generate(engine, prompt, sampling, kv=result.kv, first_token=result.first_token,
                                generated=tuple(whole[:4]))
    assert [*whole[:4], *resumed] == whole


async def test_long_prompt_and_repeated_text(engine: TorchEngine) -> None:
    prompt = encode(engine, "lorem ipsum dolor " * 120)
    assert len(prompt) >= 480
    sampling = Sampling.create(max_tokens=6, ignore_eos=True)
    unified, _ = await generate(engine, prompt, sampling)
    result = await engine.prefill(PrefillRequest("p", prompt, sampling))
    rest, _ = await generate(engine, prompt, sampling, kv=result.kv, first_token=result.first_token)
    assert [result.first_token, *rest] == unified


async def test_max_tokens_counts_the_first_token(engine: TorchEngine) -> None:
    prompt = encode(engine, "x")
    one = Sampling.create(max_tokens=1, ignore_eos=True)
    result = await engine.prefill(PrefillRequest("p", prompt, one))
    assert result.kv is None and result.finish_reason == FinishReason.LENGTH
    tokens, finish = await generate(engine, prompt, Sampling.create(max_tokens=3, ignore_eos=True))
    assert len(tokens) == 3 and finish == FinishReason.LENGTH


async def test_stop_token_ends_the_sequence_on_that_token(engine: TorchEngine) -> None:
    prompt = encode(engine, PROMPTS[2])
    free, _ = await generate(engine, prompt, Sampling.create(max_tokens=12, ignore_eos=True))
    stop_at = free[5]
    tokens, finish = await generate(engine, prompt, Sampling.create(max_tokens=12, stop_token_ids=(stop_at,),
                                                                    ignore_eos=True))
    assert finish == FinishReason.STOP_TOKEN
    assert tokens == free[:free.index(stop_at) + 1]


async def test_stop_string_finishes_at_the_token_that_completes_it(engine: TorchEngine) -> None:
    prompt = encode(engine, PROMPTS[2])
    free, _ = await generate(engine, prompt, Sampling.create(max_tokens=16, ignore_eos=True))
    text = engine.tokenizer.decode(free)
    stop = text[len(text) // 2:len(text) // 2 + 2].strip() or text[-1]

    tokens, finish = await generate(engine, prompt, Sampling.create(max_tokens=16, stop=(stop,), ignore_eos=True))

    assert finish == FinishReason.STOP_STRING
    assert stop in engine.tokenizer.decode(tokens)
    assert stop not in engine.tokenizer.decode(tokens[:-1])
    assert tokens == free[:len(tokens)]


async def test_context_limit_finishes_with_context_full(cache_dir: Path) -> None:
    engine = TorchEngine(EngineConfig(model="tiny", cache_dir=str(cache_dir), max_context_tokens=8))
    await engine.start()
    try:
        tokens, finish = await generate(engine, (5, 6, 7, 8, 9), Sampling.create(max_tokens=50, ignore_eos=True))
        assert finish == FinishReason.CONTEXT_FULL and len(tokens) == 3
        with pytest.raises(InvalidRequest, match="context limit of 8"):
            await generate(engine, tuple(range(1, 9)), Sampling.create(max_tokens=5))
    finally:
        await engine.close()


async def test_concurrent_sequences_batch_and_match_one_at_a_time(engine: TorchEngine) -> None:
    sampling = Sampling.create(max_tokens=10, ignore_eos=True)
    prompts = [encode(engine, text) for text in PROMPTS * 2]
    alone = [await generate(engine, p, sampling) for p in prompts]
    together = await asyncio.gather(*(generate(engine, p, sampling) for p in prompts))
    assert list(together) == alone


async def test_closing_the_iterator_frees_the_sequence(engine: TorchEngine) -> None:
    steps = engine.decode(DecodeRequest("c", encode(engine, "hello"), Sampling.create(max_tokens=500,
                                                                                      ignore_eos=True)))
    await steps.__anext__()
    assert engine.stats().active_sequences == 1
    await steps.aclose()
    deadline = asyncio.get_running_loop().time() + 5
    while engine.stats().active_sequences:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)


async def test_another_models_kv_is_refused(engine: TorchEngine, cache_dir: Path) -> None:
    other = TorchEngine(EngineConfig(model="tiny", cache_dir=str(cache_dir), seed=1))
    await other.start()
    try:
        prompt = encode(engine, "hello")
        result = await other.prefill(PrefillRequest("p", prompt, Sampling.create(max_tokens=4, ignore_eos=True)))
        assert other.layout.model_fingerprint != engine.layout.model_fingerprint
        with pytest.raises(KvMismatch, match="model_fingerprint"):
            await generate(engine, prompt, Sampling.create(max_tokens=4), kv=result.kv,
                           first_token=result.first_token)
    finally:
        await other.close()


async def test_bad_requests_name_the_field(engine: TorchEngine) -> None:
    sampling = Sampling.create(max_tokens=4)
    with pytest.raises(InvalidRequest, match="prompt"):
        await engine.prefill(PrefillRequest("p", (), sampling))
    with pytest.raises(InvalidRequest, match=r"token ids must be 0\.\.511"):
        await engine.prefill(PrefillRequest("p", (1, 9999), sampling))
    result = await engine.prefill(PrefillRequest("p", (1, 2, 3), Sampling.create(max_tokens=4, ignore_eos=True)))
    with pytest.raises(InvalidRequest, match="first_token is required"):
        await generate(engine, (1, 2, 3), sampling, kv=result.kv)
    with pytest.raises(InvalidRequest, match="kv covers 3 tokens"):
        await generate(engine, (1, 2), sampling, kv=result.kv, first_token=result.first_token)


async def test_failed_start_names_the_setting_and_close_is_safe(tmp_path: Path) -> None:
    engine = TorchEngine(EngineConfig(model=str(tmp_path / "missing")))
    with pytest.raises(EngineError, match="checkpoint directory"):
        await engine.start()
    await engine.close()
    await engine.close()
    with pytest.raises(EngineError, match="closed"):
        await engine.prefill(PrefillRequest("p", (1,), Sampling.create()))
    bad_device = TorchEngine(EngineConfig(model=str(tmp_path), device="gpu0"))
    with pytest.raises(EngineError, match='device must be "cpu"'):
        await bad_device.start()
    await bad_device.close()


async def test_stats_report_capacity_and_block_use(engine: TorchEngine) -> None:
    stats = engine.stats()
    assert stats.kv_block_size == 16 and stats.max_batch_size == 4 and stats.kv_blocks_total > 0
    steps = engine.decode(DecodeRequest("s", tuple(range(1, 40)), Sampling.create(max_tokens=100, ignore_eos=True)))
    await steps.__anext__()
    assert engine.stats().kv_blocks_used >= 3  # 40+ tokens in blocks of 16
    await steps.aclose()
