"""SimEngine through the Engine interface: timing on a virtual clock, batching, KV, determinism."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from engine.base import (
    CapacityExhausted,
    DecodeRequest,
    DecodeStep,
    EngineConfig,
    EngineError,
    FinishReason,
    InvalidRequest,
    KvMismatch,
    PrefillRequest,
    Sampling,
    create_engine,
)
from engine.byte_tokenizer import EOS_ID
from engine.sim import decode_step_seconds, get_profile, gpu_set, prefill_seconds
from tests.support.sim_engine import SPEEDUP, VirtualTime, sim

PROMPT = tuple(range(1000, 1300))


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.001)


async def collect(stream: AsyncIterator[DecodeStep]) -> tuple[list[int], str | None]:
    tokens: list[int] = []
    reason = None
    async for step in stream:
        tokens += step.token_ids
        reason = step.finish_reason
    return tokens, reason


def sampling(**values: Any) -> Sampling:
    return Sampling.create(**{"max_tokens": 12, **values})


async def test_prefill_takes_the_roofline_time_and_queues_fifo() -> None:
    vt = VirtualTime()
    async with sim(vt, model="llama-3-70b", gpu_count=4) as engine:
        prompt_a, prompt_b = tuple(range(5000, 8000)), tuple(range(9000, 12000))
        vt.gate.clear()
        a = asyncio.create_task(engine.prefill(PrefillRequest("a", prompt_a, sampling())))
        b = asyncio.create_task(engine.prefill(PrefillRequest("b", prompt_b, sampling())))
        await until(lambda: engine.stats().active_requests == 2)
        assert engine.stats().queued_prefill_tokens == 6000
        vt.gate.set()
        first, second = await a, await b
        expected = prefill_seconds(gpu_set("H100-SXM", 4), get_profile("llama-3-70b"), 3000) / SPEEDUP
        assert first.prefill_s == pytest.approx(expected, rel=1e-9)
        assert second.prefill_s == pytest.approx(expected, rel=1e-9)
        assert second.queue_s == pytest.approx(first.prefill_s, rel=1e-9)
        assert first.cached_tokens == second.cached_tokens == 0
        assert first.kv is not None and first.kv.num_tokens == 3000
        assert first.kv.params["simulated_nbytes"] == str(3000 * 327680)


async def test_decode_steps_take_the_roofline_step_time() -> None:
    vt = VirtualTime()
    async with sim(vt) as engine:
        tokens, reason = await collect(engine.decode(DecodeRequest("a", PROMPT, sampling(max_tokens=5))))
        assert len(tokens) == 5 and reason == FinishReason.LENGTH
        gpus, profile = gpu_set("H100-SXM"), get_profile("llama-3-8b")
        n = len(PROMPT)
        expected = prefill_seconds(gpus, profile, n) + sum(decode_step_seconds(gpus, profile, [c]) for c in
                                                           range(n, n + 4))
        assert vt.now == pytest.approx(expected / SPEEDUP, rel=1e-9)


async def test_repeated_prompt_is_served_from_the_prefix_cache() -> None:
    vt = VirtualTime()
    async with sim(vt) as engine:
        prompt = tuple(range(2000, 3000))
        first = await engine.prefill(PrefillRequest("a", prompt, sampling()))
        again = await engine.prefill(PrefillRequest("b", prompt, sampling()))
        assert (first.cached_tokens, again.cached_tokens) == (0, 992)  # whole 16-token blocks, last token recomputed
        gpus, profile = gpu_set("H100-SXM"), get_profile("llama-3-8b")
        assert again.prefill_s == pytest.approx(prefill_seconds(gpus, profile, 8, 992) / SPEEDUP, rel=1e-9)
        assert again.prefill_s < first.prefill_s / 4
        assert again.first_token == first.first_token
        assert engine.stats().prefix_cache_hit_rate == pytest.approx(992 / 2000)


async def test_cached_prefix_is_evicted_least_recent_tail_first() -> None:
    async with sim(kv_blocks=70) as engine:
        a, b = tuple(range(2000, 3000)), tuple(range(4000, 5000))
        await engine.prefill(PrefillRequest("a", a, sampling()))
        await engine.prefill(PrefillRequest("b", b, sampling()))
        # b's 63 blocks took the 8 free ones and 55 of a's 62 cached ones, tail first.
        again = await engine.prefill(PrefillRequest("a2", a, sampling()))
        assert again.cached_tokens == 7 * 16


async def test_second_sequence_joins_a_running_batch_and_cancel_frees_its_blocks() -> None:
    async with sim(max_batch_size=4) as engine:
        a = engine.decode(DecodeRequest("a", PROMPT, sampling(max_tokens=1000)))
        for _ in range(3):
            await anext(a)
        alone = engine.stats()
        assert (alone.active_sequences, alone.active_requests) == (1, 1)
        b = engine.decode(DecodeRequest("b", tuple(range(4000, 4100)), sampling(max_tokens=1000)))
        await anext(b)
        step = await anext(a)  # a keeps going while b is in the batch
        assert step.finish_reason is None
        both = engine.stats()
        assert (both.active_sequences, both.active_requests) == (2, 2)
        assert both.kv_blocks_used > alone.kv_blocks_used
        await a.aclose()
        after = engine.stats()
        assert (after.active_sequences, after.active_requests) == (1, 1)
        assert after.kv_blocks_used < both.kv_blocks_used
        assert (await anext(b)).token_ids
        await b.aclose()


async def test_max_batch_size_makes_extra_sequences_wait() -> None:
    vt = VirtualTime()
    async with sim(vt, max_batch_size=1) as engine:
        order: list[str] = []

        async def run(name: str, prompt: tuple[int, ...]) -> None:
            async for step in engine.decode(DecodeRequest(name, prompt, sampling(max_tokens=4))):
                order.extend([name] * len(step.token_ids))

        await asyncio.gather(run("a", PROMPT), run("b", tuple(range(4000, 4100))))
        assert order == ["a"] * 4 + ["b"] * 4


@pytest.mark.parametrize("values", [{}, {"temperature": 0.8, "seed": 7}])
async def test_disaggregated_equals_unified(values: dict[str, Any]) -> None:
    # Prefill and decode on different GPU types: same model, same layout.
    async with sim(gpu_type="A100-80GB") as p, sim() as d:
        s = sampling(**values)
        unified, reason = await collect(d.decode(DecodeRequest("u", PROMPT, s)))
        assert len(unified) == 12 and reason == FinishReason.LENGTH
        result = await p.prefill(PrefillRequest("p", PROMPT, s))
        assert result.kv is not None
        rest, _ = await collect(d.decode(DecodeRequest("d", PROMPT, s, kv=result.kv, first_token=result.first_token)))
        assert [result.first_token, *rest] == unified
        other_prompt, _ = await collect(d.decode(DecodeRequest("o", (*PROMPT[:-1], 7), s)))
        assert other_prompt != unified


async def test_seed_picks_the_sample_and_greedy_ignores_it() -> None:
    async with sim() as engine:
        runs = {}
        cases: dict[str, dict[str, Any]] = {
            "s7": {"temperature": 1.0, "seed": 7}, "s8": {"temperature": 1.0, "seed": 8},
            "g7": {"seed": 7}, "g8": {"seed": 8},
        }
        for name, values in cases.items():
            runs[name], _ = await collect(engine.decode(DecodeRequest(name, PROMPT, sampling(**values))))
        assert runs["s7"] != runs["s8"] and runs["g7"] == runs["g8"] != runs["s7"]


async def test_migration_continues_identically() -> None:
    async with sim() as p, sim() as d:
        s = sampling(temperature=0.7, seed=3)
        full, _ = await collect(d.decode(DecodeRequest("u", PROMPT, s)))
        sent = tuple(full[:5])
        # Unified resume: the decode worker rebuilds the KV of prompt + sent.
        resumed, reason = await collect(d.decode(DecodeRequest("m", PROMPT, s, generated=sent)))
        assert [*sent, *resumed] == full and reason == FinishReason.LENGTH
        # Disaggregated resume: a prefill worker prefills prompt + sent.
        result = await p.prefill(PrefillRequest("p", PROMPT + sent, s))
        assert result.first_token == full[5] and result.kv is not None
        rest, _ = await collect(d.decode(DecodeRequest("m2", PROMPT, s, kv=result.kv, first_token=result.first_token,
                                                       generated=sent)))
        assert [*sent, result.first_token, *rest] == full


async def test_import_checks_layout_and_tokens() -> None:
    async with sim(model="gpt-oss-120b") as oss, sim() as llama:
        foreign = await oss.prefill(PrefillRequest("x", PROMPT, sampling()))
        assert foreign.kv is not None
        with pytest.raises(KvMismatch, match="KV model_fingerprint differs: this worker has 'sim:llama-3-8b:v1'"):
            await anext(llama.decode(DecodeRequest("d", PROMPT, sampling(), kv=foreign.kv, first_token=65)))
        own = await llama.prefill(PrefillRequest("y", PROMPT, sampling()))
        assert own.kv is not None
        other = (*PROMPT[:-1], 5)
        with pytest.raises(KvMismatch, match="covers other tokens"):
            await anext(llama.decode(DecodeRequest("d", other, sampling(), kv=own.kv, first_token=65)))


async def test_real_kv_bytes_have_the_simulated_size() -> None:
    async with sim(extra={"sim_kv_bytes": "real"}) as engine:
        result = await engine.prefill(PrefillRequest("p", PROMPT, sampling()))
        assert result.kv is not None
        assert result.kv.nbytes == int(result.kv.params["simulated_nbytes"]) == len(PROMPT) * 131072
        request = DecodeRequest("d", PROMPT, sampling(), kv=result.kv, first_token=result.first_token)
        tokens, _ = await collect(engine.decode(request))
        assert len(tokens) == 11


async def test_eos_stop_tokens_and_stop_strings() -> None:
    async with sim(extra={"sim_eos_rate": "1"}) as eos_engine:
        result = await eos_engine.prefill(PrefillRequest("e", PROMPT, sampling()))
        assert (result.first_token, result.finish_reason, result.kv) == (EOS_ID, FinishReason.STOP_TOKEN, None)
        ignored, reason = await collect(eos_engine.decode(DecodeRequest("i", PROMPT, sampling(ignore_eos=True))))
        assert EOS_ID not in ignored and reason == FinishReason.LENGTH
    async with sim() as engine:
        full, _ = await collect(engine.decode(DecodeRequest("u", PROMPT, sampling(max_tokens=40))))
        stop_id = full[3]
        tokens, reason = await collect(engine.decode(
            DecodeRequest("t", PROMPT, sampling(max_tokens=40, stop_token_ids=(stop_id,)))))
        assert tokens == full[: full.index(stop_id) + 1] and reason == FinishReason.STOP_TOKEN
        text = engine.tokenizer.decode(full)
        stop = text[5:7]
        tokens, reason = await collect(engine.decode(DecodeRequest("s", PROMPT, sampling(max_tokens=40, stop=(stop,)))))
        assert tokens == full[: text.index(stop) + 2] and reason == FinishReason.STOP_STRING


async def test_import_without_free_blocks_is_refused() -> None:
    async with sim() as p, sim(kv_blocks=10) as d:
        a = await p.prefill(PrefillRequest("a", tuple(range(100)), sampling()))
        b = await p.prefill(PrefillRequest("b", tuple(range(200, 300)), sampling()))
        assert a.kv is not None and b.kv is not None
        first = d.decode(DecodeRequest("a", tuple(range(100)), sampling(), kv=a.kv, first_token=a.first_token))
        await anext(first)
        with pytest.raises(CapacityExhausted, match="no KV blocks to import 100 tokens"):
            await anext(d.decode(DecodeRequest("b", tuple(range(200, 300)), sampling(), kv=b.kv,
                                               first_token=b.first_token)))
        await first.aclose()


async def test_bad_requests_name_the_field() -> None:
    async with sim(max_context_tokens=64) as engine:
        with pytest.raises(InvalidRequest, match="prompt must not be empty"):
            await engine.prefill(PrefillRequest("a", (), sampling()))
        with pytest.raises(InvalidRequest, match=r"prompt token ids must be 0\.\.128255, got 128256"):
            await engine.prefill(PrefillRequest("a", (1, 128256), sampling()))
        with pytest.raises(InvalidRequest, match="prompt has 64 tokens; this worker's context limit is 64"):
            await anext(engine.decode(DecodeRequest("a", tuple(range(64)), sampling())))
        tokens, reason = await collect(engine.decode(DecodeRequest("b", tuple(range(60)), sampling())))
        assert len(tokens) == 4 and reason == FinishReason.CONTEXT_FULL
        with pytest.raises(InvalidRequest, match=r"generated token ids must be 0\.\.128255, got -1"):
            await anext(engine.decode(DecodeRequest("c", (1, 2), sampling(), generated=(5, -1))))


async def test_cancelled_prefill_leaves_nothing_behind() -> None:
    vt = VirtualTime()
    async with sim(vt) as engine:
        vt.gate.clear()
        running = asyncio.create_task(engine.prefill(PrefillRequest("a", PROMPT, sampling())))
        queued = asyncio.create_task(engine.prefill(PrefillRequest("b", tuple(range(4000, 4500)), sampling())))
        await until(lambda: engine.stats().queued_prefill_tokens == 800)
        assert engine.stats().kv_blocks_used > 0
        queued.cancel()
        running.cancel()
        await asyncio.gather(running, queued, return_exceptions=True)
        assert engine.stats().queued_prefill_tokens == 0
        vt.gate.set()
        assert (await engine.prefill(PrefillRequest("c", PROMPT, sampling()))).kv is not None


async def test_lifecycle_errors_and_close() -> None:
    unstarted = create_engine("sim", EngineConfig(model="llama-3-8b", gpu_type="H100-SXM"))
    assert unstarted.stats().kv_blocks_total == 0
    with pytest.raises(EngineError, match="not started"):
        _ = unstarted.layout
    await unstarted.close()
    await unstarted.close()
    too_big = create_engine("sim", EngineConfig(model="llama-3-70b", gpu_type="H100-SXM"))
    with pytest.raises(EngineError, match="llama-3-70b does not fit on 1 x H100-SXM"):
        await too_big.start()
    await too_big.close()
    with pytest.raises(EngineError, match="unknown sim model profile 'tiny'"):
        await create_engine("sim", EngineConfig(gpu_type="H100-SXM")).start()

    engine = create_engine("sim", EngineConfig(model="llama-3-8b", gpu_type="H100-SXM", speedup=SPEEDUP))
    await engine.start()
    stream = engine.decode(DecodeRequest("a", PROMPT, sampling(max_tokens=8000)))
    await anext(stream)
    await engine.close()
    with pytest.raises(EngineError, match="closed"):
        async for _ in stream:
            pass
    with pytest.raises(EngineError, match="closed"):
        await engine.prefill(PrefillRequest("b", PROMPT, sampling()))
    await engine.close()


def test_importing_the_sim_engine_does_not_import_torch() -> None:
    code = "import sys, engine.sim; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
