"""What a router saw of its traffic, per model, over a sliding window: the planner's input. Pure.

Every call takes `now`: the request path records an arrival (prompt length)
and a finish (output length, TTFT, inter-token latency, success), and
`report()` summarises the last `window_s` seconds as `ModelDemand` messages
(router_svc.demand_publisher writes them to the registry).

Whether a request met its SLO is decided at report time against the model
spec's targets (ServiceLevelObjectives): the spec may change while the
request runs, and the request path stays two appends.

Memory is bounded: each model keeps at most `max_samples` arrivals and as
many finishes (the oldest go first; at the cap the rate is computed over the
span the samples cover, so it stays right).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tandem.v1 import registry_pb2

DEFAULT_WINDOW_S = 60.0
DEFAULT_MAX_SAMPLES = 50_000


@dataclass(frozen=True)
class _Finished:
    at: float
    ok: bool
    output_tokens: int
    ttft_s: float
    inter_token_s: float


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


class DemandWindow:
    def __init__(self, window_s: float = DEFAULT_WINDOW_S, max_samples: int = DEFAULT_MAX_SAMPLES) -> None:
        if window_s <= 0 or max_samples < 1:
            raise ValueError("window_s must be > 0 and max_samples >= 1")
        self.window_s = window_s
        self.max_samples = max_samples
        self._arrivals: dict[str, deque[tuple[float, int]]] = {}
        self._finishes: dict[str, deque[_Finished]] = {}

    def arrived(self, model: str, prompt_tokens: int, now: float) -> None:
        samples = self._arrivals.get(model)
        if samples is None:
            samples = self._arrivals[model] = deque(maxlen=self.max_samples)
        samples.append((now, prompt_tokens))

    def finished(self, model: str, now: float, *, ok: bool, output_tokens: int, ttft_s: float,
                 inter_token_s: float) -> None:
        samples = self._finishes.get(model)
        if samples is None:
            samples = self._finishes[model] = deque(maxlen=self.max_samples)
        samples.append(_Finished(now, ok, output_tokens, ttft_s, inter_token_s))

    def _prune(self, now: float) -> None:
        horizon = now - self.window_s
        for table in (self._arrivals, self._finishes):
            for model in list(table):
                samples = table[model]
                while samples and _at(samples[0]) < horizon:
                    samples.popleft()
                if not samples:
                    del table[model]

    def report(self, now: float, slos: Mapping[str, registry_pb2.ServiceLevelObjectives] | None = None
               ) -> list[registry_pb2.ModelDemand]:
        """One ModelDemand per model seen in the window, sorted by model name."""
        self._prune(now)
        slos = slos or {}
        out = []
        for model in sorted(set(self._arrivals) | set(self._finishes)):
            arrivals = self._arrivals.get(model, deque())
            finishes = [f for f in self._finishes.get(model, ()) if f.ok]
            failed = len(self._finishes.get(model, ())) - len(finishes)
            # At the sample cap the window is shorter than window_s: rate over what the samples span.
            span = self.window_s
            if len(arrivals) == self.max_samples:
                span = max(now - arrivals[0][0], 1e-3)
            prompts = [float(tokens) for _, tokens in arrivals]
            outputs = [float(f.output_tokens) for f in finishes]
            ttfts = [f.ttft_s * 1000 for f in finishes]
            itls = [f.inter_token_s * 1000 for f in finishes if f.output_tokens > 1]
            demand = registry_pb2.ModelDemand(
                model=model, requests=len(arrivals), arrival_rate_rps=len(arrivals) / span,
                finished=len(finishes), failed=failed,
                prompt_tokens_mean=_mean(prompts), prompt_tokens_p90=percentile(prompts, 90),
                output_tokens_mean=_mean(outputs), output_tokens_p90=percentile(outputs, 90),
                ttft_ms_p50=percentile(ttfts, 50), ttft_ms_p90=percentile(ttfts, 90),
                inter_token_ms_p50=percentile(itls, 50), inter_token_ms_p90=percentile(itls, 90))
            slo = slos.get(model)
            if slo is not None and (slo.ttft_ms or slo.inter_token_ms):
                demand.within_slo = sum(1 for f in finishes if within(f, slo))
            out.append(demand)
        return out


def within(finished: _Finished, slo: registry_pb2.ServiceLevelObjectives) -> bool:
    """Whether one finished request met the targets the SLO sets (an unset target is met)."""
    ttft_ok = not slo.ttft_ms or finished.ttft_s * 1000 <= slo.ttft_ms
    itl_ok = not slo.inter_token_ms or finished.output_tokens <= 1 or \
        finished.inter_token_s * 1000 <= slo.inter_token_ms
    return ttft_ok and itl_ok


def _at(sample: tuple[float, int] | _Finished) -> float:
    return sample[0] if isinstance(sample, tuple) else sample.at
