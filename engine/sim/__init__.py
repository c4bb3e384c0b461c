"""The sim engine: calibrated step timing (docs/costmodel.md), KV block accounting and a prefix cache, no model math.

Registered as "sim" (engine.sim:SimEngine). The roofline functions are public
for the router's expected-time policy and for fleet benchmarks:

    from engine.sim import gpu_set, get_profile, prefill_seconds
    prefill_seconds(gpu_set("H100-SXM", 1), get_profile("llama-3-8b"), 3000)
"""

from engine.sim.engine import SimEngine
from engine.sim.profiles import PROFILES, ModelProfile, get_profile
from engine.sim.roofline import (
    DEFAULT_PARAMS,
    ROOFLINE_PARAMS,
    GpuSet,
    RooflineParams,
    StepCost,
    decode_step_seconds,
    gpu_set,
    kv_capacity_blocks,
    prefill_seconds,
    step_cost,
    step_seconds,
    weight_bytes_touched,
)
from engine.sim.settings import SimSettings

__all__ = [
    "DEFAULT_PARAMS",
    "PROFILES",
    "ROOFLINE_PARAMS",
    "GpuSet",
    "ModelProfile",
    "RooflineParams",
    "SimEngine",
    "SimSettings",
    "StepCost",
    "decode_step_seconds",
    "get_profile",
    "gpu_set",
    "kv_capacity_blocks",
    "prefill_seconds",
    "step_cost",
    "step_seconds",
    "weight_bytes_touched",
]
