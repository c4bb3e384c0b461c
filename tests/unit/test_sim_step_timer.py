"""The sim engine's step timer answers exactly what step_seconds does, for every profile, GPU set and timing."""

from __future__ import annotations

import random

import pytest

from engine.sim.profiles import PROFILES, get_profile
from engine.sim.roofline import (
    DEFAULT_PARAMS,
    ROOFLINE_PARAMS,
    RooflineParams,
    StepTimer,
    gpu_set,
    hardware,
    model_dims,
    step_seconds,
)


@pytest.mark.parametrize("profile_id", sorted(PROFILES))
@pytest.mark.parametrize("gpu_type", ["H100-SXM", "A100-80GB", "L40S"])
@pytest.mark.parametrize("count", [1, 4])
@pytest.mark.parametrize("params", [DEFAULT_PARAMS, ROOFLINE_PARAMS, RooflineParams(mfu=0.3, mbu=0.5)])
def test_step_timer_equals_step_seconds(profile_id: str, gpu_type: str, count: int, params: RooflineParams) -> None:
    gpus = gpu_set(gpu_type, count)
    profile = PROFILES[profile_id]
    timer = StepTimer(gpus, profile, params)
    rng = random.Random(f"{profile_id}-{gpu_type}-{count}")
    works: list[list[tuple[int, int]]] = [[], [(0, 5)], [(1, 0)], [(8000, 0)], [(300, 1200)]]
    for _ in range(50):
        decodes = [(1, rng.randrange(1, 30_000)) for _ in range(rng.randrange(0, 64))]
        prefill = [(rng.randrange(1, 4096), rng.randrange(0, 20_000))] if rng.random() < 0.5 else []
        works.append(decodes + prefill)
    for work in works:
        assert timer.seconds(work) == step_seconds(gpus, profile, work, params), work


def test_step_rates_equal_step_seconds_of_mixed_work_to_the_last_bit() -> None:
    # The router prices steps through StepRates.mixed: it must be the calibrated model's answer exactly.
    from runtime.stepmodel import StepRates, mixed_work
    from runtime.stepmodel import step_seconds as model_step_seconds

    profile = get_profile("llama-3-8b")
    for gpu in ("H100-SXM", "A100-80GB", "L40S"):
        for count in (1, 4):
            gpus = gpu_set(gpu, count)
            dims, hw = model_dims(profile), hardware(gpus, profile)
            params = DEFAULT_PARAMS.step_params(gpus.gpu.catalog_id)
            rates = StepRates(dims, hw, params)
            for decodes, context, prefill, pairs in [(0, 0, 512, None), (16, 700.5, 0, None), (3, 20, 100, 9000.0),
                                                     (1, 0, 1, None), (0, 0, 0, None), (200, 4000, 256, None)]:
                expected = model_step_seconds(mixed_work(dims, decodes, context, prefill, pairs), hw, params)
                assert rates.mixed(decodes, context, prefill, pairs) == expected
