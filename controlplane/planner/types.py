"""The planner's values: what it observes, how it is configured, and what it decides. Plain frozen data.

Roles are the strings "prefill" and "decode". A worker's `role` is the role
it serves, or is switching to; the planner never sees a third state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["DECODE", "PREFILL", "ROLES", "Change", "Demand", "GoodputEstimate", "Plan", "PlannerConfig", "Slo",
           "WorkerSupply"]

PREFILL = "prefill"
DECODE = "decode"
ROLES = (PREFILL, DECODE)


@dataclass(frozen=True)
class Slo:
    """The model's service-level objective."""

    ttft_s: float            # p90 time-to-first-token target
    inter_token_s: float     # p90 inter-token latency target

    def __post_init__(self) -> None:
        for name in ("ttft_s", "inter_token_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"Slo.{name} must be a positive number of seconds, got {value}")


@dataclass(frozen=True)
class Demand:
    """One model's demand over a recent window. Zero arrival or zero lengths: no demand known."""

    arrival_rps: float
    prompt_tokens: float     # mean prompt length (tokens)
    output_tokens: float     # mean output length (tokens)
    prompt_tokens_p90: float = 0.0   # 0: use the mean
    output_tokens_p90: float = 0.0   # 0: use the mean
    # What the fleet attained over the window (p90 TTFT and inter-token latency); 0: not measured.
    ttft_p90_s: float = 0.0
    inter_token_p90_s: float = 0.0

    @property
    def known(self) -> bool:
        """Whether there is demand to plan for (arrivals with a prompt and an output)."""
        return self.arrival_rps > 0 and self.prompt_tokens > 0 and self.output_tokens > 0

    def misses(self, slo: Slo) -> bool:
        """Whether the fleet is missing the SLO now: an attained p90 above its target."""
        return self.ttft_p90_s > slo.ttft_s or self.inter_token_p90_s > slo.inter_token_s

    @property
    def prompt_p90(self) -> float:
        return max(self.prompt_tokens_p90, self.prompt_tokens)

    @property
    def output_p90(self) -> float:
        return max(self.output_tokens_p90, self.output_tokens)


@dataclass(frozen=True)
class WorkerSupply:
    """One worker as the planner sees it."""

    worker_id: str
    gpu_type: str            # GPU catalog id ("H100-SXM", "A100-80GB"); "" unknown
    gpu_count: int
    role: str                # "prefill" | "decode": the role it serves, or is switching to
    switchable: bool = True  # can change role live; a non-switchable worker keeps its role
    role_since_s: float = 0.0        # planner-clock seconds at which it took `role`
    kv_capacity_tokens: int = 0      # KV tokens it can hold; 0: derive from GPU memory and the shape
    max_batch_size: int = 0          # 0: 256

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"worker {self.worker_id}: role must be 'prefill' or 'decode', got {self.role!r}")


@dataclass(frozen=True)
class PlannerConfig:
    """Switching limits. The optimizer itself has no knobs beyond `max_enumerated`."""

    min_gain: float = 0.10   # hysteresis: change only if planned goodput >= current * (1 + min_gain)
    min_dwell_s: float = 60.0        # a worker keeps a role at least this long
    max_switches: int = 1            # workers switched per plan round
    min_prefill_workers: int = 1     # never fewer (of this model)
    min_decode_workers: int = 1
    # Exhaustive search over classes of identical workers up to this many
    # combinations; beyond it a local search from the current assignment.
    max_enumerated: int = 20000


@dataclass(frozen=True)
class GoodputEstimate:
    """The predictor's view of one role assignment at one demand."""

    goodput_rps: float           # requests/s served within the SLO at this demand
    prefill_capacity_rps: float  # highest arrival rate the prefill side serves within the TTFT target
    decode_capacity_rps: float   # highest arrival rate the decode side serves within the inter-token target
    ttft_s: float                # predicted at the demand (inf when overloaded)
    inter_token_s: float
    bottleneck: str              # "prefill" | "decode" | "none"


@dataclass(frozen=True)
class Change:
    """One worker's role switch."""

    worker_id: str
    from_role: str
    to_role: str
    why: str                     # e.g. "compute-rich H100-SXM to prefill: prompts 4096 tok, TTFT-bound"


@dataclass(frozen=True)
class Plan:
    """One planning round's decision."""

    assignment: Mapping[str, str]    # worker_id -> role after `changes`
    changes: tuple[Change, ...]      # at most max_switches; empty when held
    current: GoodputEstimate         # the assignment as it is
    planned: GoodputEstimate         # after `changes`
    best: GoodputEstimate            # the best assignment ignoring dwell, cap and hysteresis
    best_assignment: Mapping[str, str]
    explanation: str                 # one line: what it saw, what it predicts, what it changes (or why not)
    held: tuple[str, ...]            # why wanted moves were held back ("decode-3: dwell 12 s < 60 s")
