"""The fitted step-model parameters (runtime/data/step_params.toml), per GPU type and engine.

Written by bench/calibrate_costmodel.py, read once per process. A GPU type
with no published rows gets the `[gpus.default]` efficiencies (the geometric
mean of the fitted types: unvalidated, said so in docs/costmodel.md); an
engine not in the file gets the reference engine's overhead.
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.stepmodel import StepParams

STEP_PARAMS = Path(__file__).parent / "data" / "step_params.toml"


@dataclass(frozen=True)
class StepParamsTable:
    reference_engine: str
    interference: float
    allreduce_s: float
    overheads: dict[str, float]
    efficiencies: dict[str, tuple[float, float]]

    def fitted(self, gpu_type: str) -> bool:
        """True when `gpu_type` had published rows of its own."""
        return gpu_type in self.efficiencies and gpu_type != "default"

    def for_gpu(self, gpu_type: str, engine: str | None = None) -> StepParams:
        """StepParams of `gpu_type` (catalog id) on `engine` (default: the reference engine)."""
        mfu, mbu = self.efficiencies.get(gpu_type, self.efficiencies["default"])
        overhead = self.overheads.get(engine or self.reference_engine, self.overheads[self.reference_engine])
        return StepParams(mfu=mfu, mbu=mbu, overhead_s=overhead, interference=self.interference,
                          allreduce_s=self.allreduce_s)

    @classmethod
    def parse(cls, data: dict[str, Any], source: str = "step_params.toml") -> StepParamsTable:
        """ValueError names the file and the missing or bad entry."""
        try:
            ref = str(data["reference_engine"])
            shared = data["shared"]
            overheads = {e: float(t["overhead_s"]) for e, t in data["engines"].items()}
            eff = {g: (float(t["mfu"]), float(t["mbu"])) for g, t in data["gpus"].items()}
            table = cls(ref, float(shared["interference"]), float(shared["allreduce_s"]), overheads, eff)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source}: malformed step parameters ({exc!r})") from None
        if ref not in overheads or "default" not in eff:
            raise ValueError(f"{source}: needs [engines.{ref}] and [gpus.default]")
        for gpu in eff:
            table.for_gpu(gpu)  # range checks, naming the file on failure below
        return table


@functools.cache
def default_step_params() -> StepParamsTable:
    """The built-in fitted parameters."""
    try:
        return StepParamsTable.parse(tomllib.loads(STEP_PARAMS.read_text()), str(STEP_PARAMS))
    except ValueError as exc:
        raise ValueError(f"{STEP_PARAMS}: {exc}") from None
