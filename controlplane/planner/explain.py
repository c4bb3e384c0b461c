"""The planner's words: one line per plan, one reason per change. Pure string building."""

from __future__ import annotations

import math
from collections.abc import Sequence

from controlplane.planner.goodput import Predictor
from controlplane.planner.types import PREFILL, Demand, GoodputEstimate, Slo, WorkerSupply

__all__ = ["change_why", "describe_estimate", "describe_worker", "explanation"]


def _num(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def describe_worker(w: WorkerSupply) -> str:
    gpu = w.gpu_type or "unknown GPU"
    return f"{w.worker_id} ({gpu}{f' x{w.gpu_count}' if w.gpu_count > 1 else ''})"


def describe_estimate(e: GoodputEstimate, slo: Slo) -> str:
    """'2.1 req/s (prefill-bound, TTFT 2.3 s > 1.0 s)'."""
    head = f"{_num(e.goodput_rps)} req/s"
    if e.bottleneck == PREFILL:
        if e.prefill_capacity_rps <= 0 and math.isinf(e.ttft_s):
            return f"{head} (no prefill capacity within TTFT {_num(slo.ttft_s)} s)"
        ttft = "grows without bound" if math.isinf(e.ttft_s) else f"{_num(e.ttft_s)} s"
        return (f"{head} (prefill-bound, TTFT {ttft} > {_num(slo.ttft_s)} s,"
                f" prefill capacity {_num(e.prefill_capacity_rps)} req/s)")
    if e.bottleneck == "decode":
        return (f"{head} (decode-bound, decode capacity {_num(e.decode_capacity_rps)} req/s within"
                f" {_num(slo.inter_token_s * 1e3)} ms/token)")
    return (f"{head} (within SLO, headroom prefill {_num(e.prefill_capacity_rps)}"
            f" / decode {_num(e.decode_capacity_rps)} req/s)")


def saw(demand: Demand) -> str:
    return (f"saw {_num(demand.arrival_rps)} req/s, prompts {_num(demand.prompt_tokens)} tok,"
            f" outputs {_num(demand.output_tokens)} tok")


def _prefill_bias(predictor: Predictor, w: WorkerSupply) -> float:
    """Prefill speed over decode speed of this worker (the cost model's view at the demand)."""
    f = predictor.figures(w)
    if f.decode_rps <= 0 or not math.isfinite(f.prefill_s):
        return math.inf if f.decode_rps <= 0 else 0.0
    return (1.0 / f.prefill_s) / f.decode_rps


def change_why(predictor: Predictor, fleet: Sequence[WorkerSupply], w: WorkerSupply, to_role: str,
               current: GoodputEstimate, longest: bool) -> str:
    """Why this worker: its GPU's strengths at this demand, what binds now, and why it rather than a twin."""
    biases = [b for b in (_prefill_bias(predictor, x) for x in fleet) if 0 < b < math.inf]
    mine = _prefill_bias(predictor, w)
    typical = math.exp(sum(math.log(b) for b in biases) / len(biases)) if biases else mine
    # Named only where the GPU's balance is why it goes this way, not where it merely fills a count.
    if to_role == PREFILL and mine > typical * 1.05:
        kind = "compute-rich "
    elif to_role != PREFILL and mine < typical / 1.05:
        kind = "bandwidth-rich "
    else:
        kind = ""
    f = predictor.figures(w)
    demand = predictor.demand
    here = (f"here {_num(1 / f.prefill_s if f.prefill_s > 0 else math.inf)} prefills/s"
            f" vs {_num(f.decode_rps)} decode req/s")
    if to_role == PREFILL:
        need = f"prompts {_num(demand.prompt_tokens)} tok"
    else:
        need = f"outputs {_num(demand.output_tokens)} tok"
    binds = {"prefill": "TTFT-bound", "decode": "inter-token-bound"}.get(current.bottleneck, "rebalancing")
    tail = "; longest in its role of its kind" if longest else ""
    return f"{kind}{w.gpu_type or 'unknown GPU'} to {to_role}: {need}, {binds} ({here}){tail}"


def explanation(demand: Demand, slo: Slo, current: GoodputEstimate, planned: GoodputEstimate,
                changes: Sequence[tuple[WorkerSupply, str]], hold_reason: str) -> str:
    """'saw ...; current goodput ...; planned ...: decode-2 (A100-80GB) decode->prefill' (or why it holds)."""
    line = f"{saw(demand)}; current goodput {describe_estimate(current, slo)}"
    if changes:
        moves = ", ".join(f"{describe_worker(w)} {w.role}->{to}" for w, to in changes)
        return f"{line}; planned {_num(planned.goodput_rps)} req/s: {moves}"
    return f"{line}; no change: {hold_reason}"
