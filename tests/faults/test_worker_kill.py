"""SIGKILL a worker under load: the client sees no failure, no lost and no repeated token.

The promise (ARCHITECTURE.md, "Failure handling"): a prefill worker that dies
is retried elsewhere; a decode worker that dies mid-stream is migrated to a
new pair that continues from prompt + tokens already sent. Every stream is
compared token for token with the unified generation of its prompt on a
surviving decode worker (sim tokens are a pure function of the context).
"""

from __future__ import annotations

import pytest

from tandem.v1 import common_pb2
from tests.faults.conftest import SIM, Fleet, expected_generations, wait_models
from tests.support.load import LoadGenerator, LoadReport

pytestmark = [pytest.mark.fault, pytest.mark.integration]


async def assert_exact(report: LoadReport, reference_endpoint: str, sampling: common_pb2.SamplingParams) -> None:
    """Every request ended OK with exactly the unified generation of its prompt."""
    assert report.failures == [], report.failures
    expected = await expected_generations(reference_endpoint, [r.prompt for r in report.results], sampling)
    for result in report.results:
        want = expected[tuple(result.prompt)]
        first_difference = next((i for i, (a, b) in enumerate(zip(result.tokens, want, strict=False)) if a != b),
                                min(len(result.tokens), len(want)))
        assert result.tokens == want, (
            f"stream {result.stream} request {result.iteration} (migrations {result.migrations}): "
            f"{len(result.tokens)} tokens, expected {len(want)}; first difference at {first_difference}")
        assert result.finish_reason == common_pb2.FINISH_REASON_LENGTH


async def test_sigkill_decode_under_32_streams_loses_and_repeats_no_token(fleet: Fleet) -> None:
    # Real-time simulated H100 (a few ms per step): every stream is mid-flight when the worker dies.
    sim = (*SIM, "--speedup", "1", "--max-batch-size", "64")
    fleet.start("p0", "prefill_svc", *sim)
    d0 = fleet.start("d0", "decode_svc", *sim)
    d1 = fleet.start("d1", "decode_svc", *sim)
    router = fleet.start("router", "router_svc", "--local-prefill-max-prompt-tokens", "8", "--policy", "round-robin")
    await wait_models(router.endpoint, 1, 2)
    sampling = common_pb2.SamplingParams(max_tokens=200, ignore_eos=True)
    load = LoadGenerator(router.endpoint, "llama-3-8b", streams=32, sampling=sampling)
    await load.start(repeat=False)
    try:
        await load.wait_tokens(10)
        d0.kill()
        report = await load.stop()
    finally:
        await load.cancel()
    assert len(report.results) == 32
    await assert_exact(report, d1.endpoint, sampling)
    assert report.migrations >= 1, "no stream was on the killed worker: the drill proved nothing"
    assert {r.decode_worker_id for r in report.results} == {"d1"}


async def test_sigkill_prefill_under_load_fails_no_request(fleet: Fleet) -> None:
    sim = (*SIM, "--speedup", "20")
    p0 = fleet.start("p0", "prefill_svc", *sim)
    fleet.start("p1", "prefill_svc", *sim)
    d0 = fleet.start("d0", "decode_svc", *sim, "--max-batch-size", "64")
    router = fleet.start("router", "router_svc", "--local-prefill-max-prompt-tokens", "8", "--policy", "round-robin")
    await wait_models(router.endpoint, 2, 1)
    sampling = common_pb2.SamplingParams(max_tokens=16, ignore_eos=True)
    load = LoadGenerator(router.endpoint, "llama-3-8b", streams=16, sampling=sampling)
    await load.start()
    try:
        await load.wait_completed(32)
        assert any(r.prefill_worker_id == "p0" for r in load.results if r.done), "p0 took no load before the kill"
        p0.kill()
        killed_at = len(load.results)
        await load.wait_completed(killed_at + 48)
        report = await load.stop()
    finally:
        await load.cancel()
    await assert_exact(report, d0.endpoint, sampling)
    after = report.results[killed_at:]
    assert after and all(r.prefill_worker_id in ("p1", "") for r in after), "requests still routed to dead p0"
