"""SIGKILL a vLLM decode worker under concurrent streams: every stream completes, greedy streams exactly.

Its own fleet (two vLLM decode workers, one killed), so it is `slow`: about
a minute on 2 cores, most of it starting three vLLM engines. The killed
worker's vLLM engine core processes must not outlive it.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tandem.v1 import common_pb2
from tests.faults.conftest import unified_tokens, wait_models
from tests.support.load import LoadGenerator
from tests.support.testbed import Testbed
from tests.vllm.conftest import MODEL, vllm_worker_args

pytestmark = [pytest.mark.slow, pytest.mark.fault, pytest.mark.integration]


@pytest.fixture
def bed(tmp_path: Path, vllm_cache: Path, checkpoint: Path) -> Iterator[Testbed]:
    testbed = Testbed(tmp_path, shutdown_grace=5)
    try:
        testbed.start("p0", "prefill_svc", *vllm_worker_args(vllm_cache, "--kv-blocks", "256"), wait=False)
        for name in ("d0", "d1"):
            testbed.start(name, "decode_svc", *vllm_worker_args(vllm_cache, "--kv-blocks", "256"), wait=False)
        testbed.start("router", "router_svc", "--tokenizer", f"{MODEL}={checkpoint}",
                      "--local-prefill-max-prompt-tokens", "8", "--policy", "round-robin", wait=False)
        for child in testbed.children.values():
            child.wait_ready(300)
        yield testbed
    finally:
        assert not testbed.close(), "children left running"


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (vLLM's engine core and its workers)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def engine_kv_dirs() -> set[Path]:
    """The KV file directories of the vLLM engines running here (engine.vllm.engine, on /dev/shm)."""
    return set(Path("/dev/shm").glob("tandem-vllm-kv-*"))


def survivors(pids: set[int], wait_s: float = 30.0) -> list[int]:
    """Those of `pids` still alive after waiting up to `wait_s` for all of them to exit."""
    deadline = time.monotonic() + wait_s
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)  # poll interval
    return sorted(pid for pid in pids if alive(pid))


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_sigkill_vllm_decode_under_streams_loses_no_token(bed: Testbed) -> None:
    router = bed.children["router"]
    await wait_models(router.endpoint, 1, 2, model=MODEL, timeout=60)
    sampling = common_pb2.SamplingParams(max_tokens=400, ignore_eos=True)
    load = LoadGenerator(router.endpoint, MODEL, streams=8, sampling=sampling)
    victim = bed.children["d0"]
    engine_processes = descendants(victim.pid)
    kv_dirs = engine_kv_dirs()
    assert engine_processes, "the decode worker runs no vLLM engine core process"
    await load.start(repeat=False)
    try:
        await load.wait_tokens(8, timeout=120)
        victim.kill()
        report = await load.stop(timeout=240)
    finally:
        await load.cancel()
    assert report.failures == [], report.failures
    assert report.migrations >= 1, "no stream was on the killed worker: the drill proved nothing"
    survivor = bed.children["d1"].endpoint
    for result in report.results:
        # The unkilled run: the whole generation on the surviving worker, prefilled there.
        expected = await unified_tokens(survivor, result.prompt, sampling, model=MODEL)
        assert result.tokens == expected, f"stream {result.stream} (migrations {result.migrations})"
        assert result.finish_reason == common_pb2.FINISH_REASON_LENGTH
    # The killed worker's engine core notices its parent is gone and exits with its workers.
    left = await asyncio.to_thread(survivors, engine_processes)
    for pid in left:  # do not leave them behind for the rest of the suite
        os.kill(pid, 9)
    assert not left, f"vLLM processes outlived their killed worker: {left}"
    # They removed the KV file directory the killed worker could not (the other workers keep theirs).
    gone = kv_dirs - engine_kv_dirs()
    assert len(gone) == 1 and len(kv_dirs) >= 3, (kv_dirs, gone)
