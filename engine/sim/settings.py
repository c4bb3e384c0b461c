"""The sim engine's own settings, read from EngineConfig.extra ("sim_*" keys). Pure."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from engine.base import EngineError
from engine.sim.roofline import RooflineParams

# KvBlob.data: "tokens" (the token ids, a few bytes per token) or "real" (as many bytes
# as the real KV cache, to load the KV transports). Workers expose it as --sim-kv-bytes.
KV_BYTES_MODES = ("tokens", "real")
DEFAULT_KV_BYTES = KV_BYTES_MODES[0]


@dataclass(frozen=True)
class SimSettings:
    """Roofline assumptions plus the engine's behaviour knobs."""

    roofline: RooflineParams = field(default_factory=RooflineParams)
    # Tokens one step may compute (decode tokens plus a prefill chunk), like
    # vLLM's max_num_batched_tokens; longer prompts prefill in chunks.
    max_step_tokens: int = 8192
    # Probability that the simulated model draws EOS at a position (0: never).
    eos_rate: float = 0.0
    kv_bytes: str = DEFAULT_KV_BYTES  # one of KV_BYTES_MODES

    def describe(self) -> list[str]:
        """One line per assumption, for benchmark output."""
        return [
            *self.roofline.describe(),
            f"max_step_tokens = {self.max_step_tokens}: tokens per engine step (decode + one prefill chunk)",
            f"eos_rate = {self.eos_rate}: probability of drawing EOS per position",
            f"kv_bytes = {self.kv_bytes}: KV payload ('real' = full simulated size)",
        ]

    @classmethod
    def from_extra(cls, extra: Mapping[str, str]) -> SimSettings:
        """Parses the "sim_*" keys of `extra`; EngineError names a bad key or value and the allowed range."""
        floats = {name: f"sim_{name}" for name in ("mfu", "mbu", "tp_efficiency", "memory_utilization",
                                                   "activation_reserve_gb")}
        known = {*floats.values(), "sim_timing", "sim_max_step_tokens", "sim_eos_rate", "sim_kv_bytes"}
        unknown = sorted(k for k in extra if k.startswith("sim_") and k not in known)
        if unknown:
            raise EngineError(f"unknown sim setting {unknown[0]!r}; known: {', '.join(sorted(known))}")
        roofline_values: dict[str, float | str | None] = {
            name: _parse(extra, key, float) for name, key in floats.items() if key in extra}
        if "sim_timing" in extra:
            roofline_values["timing"] = extra["sim_timing"]
        try:
            roofline = RooflineParams.create(**roofline_values)
        except EngineError as exc:
            raise EngineError(str(exc).replace("sim ", "sim_", 1)) from None
        settings = cls(roofline=roofline)
        if "sim_max_step_tokens" in extra:
            steps = _parse(extra, "sim_max_step_tokens", int)
            if steps < 1:
                raise EngineError(f"sim_max_step_tokens must be >= 1, got {steps}")
            settings = replace(settings, max_step_tokens=steps)
        if "sim_eos_rate" in extra:
            rate = _parse(extra, "sim_eos_rate", float)
            if not 0.0 <= rate <= 1.0:
                raise EngineError(f"sim_eos_rate must be in [0, 1], got {rate}")
            settings = replace(settings, eos_rate=rate)
        if "sim_kv_bytes" in extra:
            mode = extra["sim_kv_bytes"]
            if mode not in KV_BYTES_MODES:
                raise EngineError(f"sim_kv_bytes must be one of {', '.join(KV_BYTES_MODES)}, got {mode!r}")
            settings = replace(settings, kv_bytes=mode)
        return settings


def _parse(extra: Mapping[str, str], key: str, kind: Callable[[str], Any]) -> Any:
    try:
        value = kind(extra[key])
    except ValueError:
        raise EngineError(f"{key} must be a{'n integer' if kind is int else ' number'}, got {extra[key]!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise EngineError(f"{key} must be finite, got {extra[key]!r}")
    return value

