"""The sim engine's step timer answers exactly what step_seconds does, for every profile, GPU set and timing."""

from __future__ import annotations

import random

import pytest

from engine.sim.profiles import PROFILES
from engine.sim.roofline import DEFAULT_PARAMS, ROOFLINE_PARAMS, RooflineParams, StepTimer, gpu_set, step_seconds


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
