"""VllmEngine's choices that need no running vLLM: block size, an unstarted engine, the registry entry."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.base import EngineConfig, EngineError, create_engine, engine_names
from engine.vllm.engine import VllmEngine, _block_size
from engine.vllm.stats import StatsHolder


def test_registered_by_name() -> None:
    assert "vllm" in engine_names()
    assert isinstance(create_engine("vllm", EngineConfig(model="tiny-vllm")), VllmEngine)


@pytest.mark.parametrize(("device", "asked", "used"), [("cpu", 16, 32), ("cpu", 32, 32), ("cpu", 48, 64),
                                                       ("cuda", 16, 16)])
def test_cpu_block_size_is_a_multiple_of_32(device: str, asked: int, used: int) -> None:
    assert _block_size(EngineConfig(device=device, kv_block_size=asked)) == used


async def test_an_unstarted_engine_says_so_and_closes_twice() -> None:
    engine = create_engine("vllm", EngineConfig(model="tiny-vllm", kv_block_size=16))
    assert engine.stats().kv_block_size == 32 and engine.stats().kv_blocks_used == 0
    with pytest.raises(EngineError, match="call start"):
        _ = engine.layout
    await engine.close()
    await engine.close()
    with pytest.raises(EngineError, match="start"):
        await engine.start()


async def test_a_missing_checkpoint_fails_start_with_a_clear_error(tmp_path: Path) -> None:
    engine = create_engine("vllm", EngineConfig(model=str(tmp_path / "nowhere")))
    with pytest.raises(EngineError,
                       match=r"neither a built-in name \(tiny-vllm, smollm2-135m\) nor a checkpoint directory"):
        await engine.start()
    await engine.close()


def test_idle_stats_hold_no_blocks() -> None:
    class Step:
        kv_cache_usage, num_running_reqs, num_waiting_reqs = 0.5, 3, 1

    holder = StatsHolder()
    holder.record(Step())
    assert holder.snapshot().running == 3 and holder.snapshot().kv_usage == 0.5
    assert holder.snapshot(idle=True).kv_usage == 0.0
