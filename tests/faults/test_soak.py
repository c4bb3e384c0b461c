"""A soak at steady load: nothing grows, nothing is left behind.

Ten minutes (TANDEM_SOAK_SECONDS overrides, e.g. 60 for a quick check) of
steady streams through a router to one prefill and two decode workers. The
resident memory of every process (etcd, workers, router) after warm-up and at
the end must agree within 10 %; once the load stops, every worker reports no
open KV handle, no active sequence and no active request; every request
ended OK with exactly the unified generation of its prompt.

    pytest -m slow tests/faults/test_soak.py
    TANDEM_SOAK_SECONDS=60 pytest -m slow tests/faults/test_soak.py
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tandem.v1 import common_pb2
from tests.faults.conftest import SIM, Fleet, expected_generations, get_load, wait_models, wait_until
from tests.support.load import LoadGenerator

pytestmark = [pytest.mark.slow, pytest.mark.fault, pytest.mark.integration]

RSS_GROWTH_LIMIT = 0.10


def soak_seconds() -> float:
    raw = os.environ.get("TANDEM_SOAK_SECONDS", "600")
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"TANDEM_SOAK_SECONDS must be a number of seconds, got {raw!r}") from None
    if seconds < 20:
        raise ValueError(f"TANDEM_SOAK_SECONDS must be at least 20 (warm-up included), got {seconds:g}")
    return seconds


def rss_kib(pid: int) -> int:
    """VmRSS of `pid` in KiB, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def rss_of(fleet: Fleet) -> dict[str, int]:
    pids = {name: child.pid for name, child in fleet.children.items()}
    pids["etcd"] = fleet.etcd.pid or 0
    return {name: rss_kib(pid) for name, pid in pids.items()}


async def test_steady_load_keeps_memory_flat_and_leaves_nothing_behind(fleet: Fleet) -> None:
    duration = soak_seconds()
    warmup = max(10.0, duration * 0.1)
    sim = (*SIM, "--speedup", "50", "--max-batch-size", "32")
    fleet.start("p0", "prefill_svc", *sim)
    fleet.start("d0", "decode_svc", *sim)
    d1 = fleet.start("d1", "decode_svc", *sim)
    router = fleet.start("router", "router_svc", "--local-prefill-max-prompt-tokens", "8")
    await wait_models(router.endpoint, 1, 2)
    sampling = common_pb2.SamplingParams(max_tokens=32, ignore_eos=True)
    load = LoadGenerator(router.endpoint, "llama-3-8b", streams=8, sampling=sampling)
    await load.start()
    try:
        # Steady load is the point: these sleeps are the soak's duration, not a wait for something.
        await asyncio.sleep(warmup)
        warm = rss_of(fleet)
        await asyncio.sleep(duration - warmup)
        end = rss_of(fleet)
        report = await load.stop()
    finally:
        await load.cancel()

    assert report.failures == [], report.failures[:20]
    grown = {name: f"{warm[name]} -> {end[name]} KiB" for name in warm
             if end[name] > warm[name] * (1 + RSS_GROWTH_LIMIT)}
    assert grown == {}, f"resident memory grew more than {RSS_GROWTH_LIMIT:.0%} after warm-up: {grown}"

    async def idle() -> bool:
        loads = [await get_load(w.endpoint) for w in fleet.workers().values()]
        return all(r.open_kv_handles == 0 and r.active_sequences == 0 and r.active_requests == 0 for r in loads)

    await wait_until(idle, 10, "no KV handle, sequence or request left on any worker")
    expected = await expected_generations(d1.endpoint, [r.prompt for r in report.results], sampling)
    wrong = [r.describe() for r in report.results if r.tokens != expected[tuple(r.prompt)]]
    assert wrong == [], wrong[:20]
    print(f"soak: {duration:g}s, {report.completed} requests, {report.tokens} tokens, RSS KiB warm {warm} end {end}")
