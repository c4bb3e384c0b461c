"""Engines report the shape of the model they loaded (published in the worker's registry record)."""

from __future__ import annotations

import pytest

from engine.base import EngineConfig, EngineError, create_engine
from engine.sim.profiles import get_profile


async def test_the_sim_engine_reports_its_profiles_shape() -> None:
    engine = create_engine("sim", EngineConfig(model="llama-3-70b", gpu_type="H200", gpu_count=2))
    with pytest.raises(EngineError, match="not started"):
        _ = engine.model_shape
    await engine.start()
    try:
        shape, profile = engine.model_shape, get_profile("llama-3-70b")
        assert shape is not None
        assert (shape.total_params, shape.active_params, shape.weight_bytes) == \
            (profile.total_params, profile.active_params, profile.weight_bytes)
        assert shape.kv_bytes_per_token == 2 * 80 * 8 * 128 * 2
        assert (shape.num_layers, shape.num_kv_heads, shape.head_dim) == (80, 8, 128)
    finally:
        await engine.close()


async def test_the_torch_engine_counts_the_loaded_tensors() -> None:
    pytest.importorskip("torch")
    engine = create_engine("torch", EngineConfig(model="tiny"))
    await engine.start()
    try:
        shape, layout = engine.model_shape, engine.layout
        assert shape is not None
        assert (shape.num_layers, shape.num_kv_heads, shape.head_dim) == \
            (layout.num_layers, layout.num_kv_heads, layout.head_dim)
        assert shape.kv_bytes_per_token == 2 * layout.num_layers * layout.num_kv_heads * layout.head_dim * 4  # fp32
        assert shape.weight_bytes == 4 * shape.total_params
        # The untied input embedding is a lookup, not matmul work.
        assert 0 < shape.active_params < shape.total_params
    finally:
        await engine.close()
