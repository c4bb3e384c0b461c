"""router_svc.demand_window.DemandWindow: the traffic summary routers publish for the planner. Plain values."""

from __future__ import annotations

import pytest

from router_svc.demand_window import DemandWindow, percentile
from tandem.v1 import registry_pb2


def _finish(window: DemandWindow, model: str, now: float, *, ttft: float, itl: float, out: int = 10,
            ok: bool = True) -> None:
    window.finished(model, now, ok=ok, output_tokens=out, ttft_s=ttft, inter_token_s=itl)


def test_rate_lengths_and_latency_over_the_window() -> None:
    window = DemandWindow(window_s=10.0)
    for i in range(20):
        window.arrived("m", prompt_tokens=100 if i < 18 else 1000, now=float(i) / 2)
    for i in range(10):
        _finish(window, "m", now=5.0 + i / 10, ttft=0.1 * (i + 1), itl=0.01, out=20 + i)
    [report] = window.report(now=10.0)
    assert report.model == "m"
    assert report.requests == 20
    assert report.arrival_rate_rps == pytest.approx(2.0)
    assert report.prompt_tokens_mean == pytest.approx((18 * 100 + 2 * 1000) / 20)
    assert report.prompt_tokens_p90 == 100  # 18 of 20 are short
    assert report.output_tokens_mean == pytest.approx(24.5)
    assert report.finished == 10 and report.failed == 0
    assert report.ttft_ms_p50 == pytest.approx(500)
    assert report.ttft_ms_p90 == pytest.approx(900)
    assert report.inter_token_ms_p90 == pytest.approx(10)
    assert report.within_slo == 0  # no SLO given: not counted


def test_old_samples_leave_the_window() -> None:
    window = DemandWindow(window_s=5.0)
    window.arrived("old", 10, now=0.0)
    window.arrived("m", 10, now=8.0)
    reports = window.report(now=10.0)
    assert [r.model for r in reports] == ["m"]
    assert reports[0].arrival_rate_rps == pytest.approx(1 / 5)
    assert window.report(now=100.0) == []


def test_within_slo_counts_requests_meeting_both_targets() -> None:
    window = DemandWindow(window_s=60.0)
    _finish(window, "m", 1.0, ttft=0.2, itl=0.02)   # meets both
    _finish(window, "m", 1.0, ttft=2.0, itl=0.02)   # TTFT missed
    _finish(window, "m", 1.0, ttft=0.2, itl=0.20)   # inter-token missed
    _finish(window, "m", 1.0, ttft=0.2, itl=0.90, out=1)  # one token: no inter-token latency to miss
    _finish(window, "m", 1.0, ttft=0.1, itl=0.01, ok=False)  # failed: never within
    slo = registry_pb2.ServiceLevelObjectives(ttft_ms=500, inter_token_ms=50)
    [report] = window.report(now=2.0, slos={"m": slo})
    assert report.finished == 4 and report.failed == 1
    assert report.within_slo == 2


def test_memory_is_bounded_and_the_rate_stays_right_at_the_cap() -> None:
    window = DemandWindow(window_s=60.0, max_samples=100)
    for i in range(1000):  # 100 requests/s for 10 s
        window.arrived("m", 10, now=i / 100)
    [report] = window.report(now=10.0)
    assert report.requests == 100
    assert report.arrival_rate_rps == pytest.approx(100, rel=0.05)


def test_percentile_by_nearest_rank() -> None:
    assert percentile([], 90) == 0.0
    assert percentile([3.0], 90) == 3.0
    assert percentile([float(i) for i in range(1, 11)], 90) == 9.0
    assert percentile([float(i) for i in range(1, 11)], 50) == 5.0
